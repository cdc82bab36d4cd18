from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.config import DISCORD_API, Config
from bot.engine.protocol import PreviewOptions
from bot.engine.types import EngineOptions
from bot.errors import ConfigError

ENV = {"DISCORD_TOKEN": "abc.def"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, "utf-8")
    return path


def test_example_config_loads_with_defaults() -> None:
    example = Path(__file__).parents[2] / "config.example.toml"
    config = Config.load(example, environ=ENV)
    assert config.token == "abc.def"
    assert config.discord.api_base_url == DISCORD_API
    assert config.model.id == "Sygil/Sygil-Diffusion"
    assert config.model.scheduler == "dpm++"
    assert config.storage.path == example.parent / "sygil.db"
    assert config.generation.size("512x768") == (512, 768)
    assert (config.queue.max_per_user, config.queue.images_per_hour, config.queue.shutdown_grace) == (3, 60, 30.0)
    assert config.moderation.roles == ()
    assert config.queue.server_share == 0.5
    assert (config.moderation.max_images_per_hour, config.moderation.max_queued) == (600, 32)
    assert config.stats.min_votes == 3
    assert (config.variation.subtle, config.variation.strong, config.upscale.strength) == (0.35, 0.7, 0.35)
    assert config.engine_options() == EngineOptions(warmup_batches=(1, 2, 4, 8), warmup_sizes=((512, 512),))


def test_engine_settings_become_engine_options(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [generation]
        sizes = ["64x64", "64x96"]
        [queue]
        max_batch = 6
        [engine]
        compile = true
        cuda_graphs = true
        channels_last = false
        fused_qkv = false
        attention = "xformers"
        warmup_sizes = ["64x96", "64x64"]
        """,
    )
    config = Config.load(path, environ=ENV)
    assert config.engine_options(tmp_path / "cache") == EngineOptions(
        compile=True,
        cuda_graphs=True,
        channels_last=False,
        fused_qkv=False,
        attention="xformers",
        warmup_batches=(1, 2, 4, 6),
        warmup_sizes=((64, 96), (64, 64)),
        compile_cache=str(tmp_path / "cache"),
    )
    batches = write(tmp_path, "[generation]\nmax_count = 1\n[queue]\nmax_batch = 1\n[engine]\nwarmup_batches = []")
    assert Config.load(batches, environ=ENV).engine_options().warmup_batches == (1,)
    chosen = write(tmp_path, "[engine]\nwarmup_batches = [8, 3, 3]")
    assert Config.load(chosen, environ=ENV).engine_options().warmup_batches == (3, 8)


def test_model_attention_slicing_still_means_slicing(tmp_path: Path) -> None:
    path = write(tmp_path, "[model]\nattention_slicing = true")
    assert Config.load(path, environ=ENV).engine_options().attention == "slicing"


def test_settings_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [discord]
        api_base_url = "http://127.0.0.1:9999/api/v10"
        gateway_url = "ws://127.0.0.1:9999/"
        guild_ids = [123, "456"]
        [model]
        id = "/models/tiny"
        scheduler = "euler-a"
        [generation]
        sizes = ["64x64", "64x96"]
        max_count = 2
        [prompts]
        blocklist = ["bad", "two words"]
        allow_truncation = true
        rating_channels = [42]
        [queue]
        images_per_hour = 0
        shutdown_grace = 5
        [moderation]
        roles = [123456789012345678, "Moderators", "42"]
        [storage]
        path = "/tmp/x.db"
        [stats]
        min_votes = 10
        [arena]
        rate = 0.25
        max_votes_per_day = 50
        """,
    )
    config = Config.load(path, environ=ENV)
    assert config.queue.images_per_hour == 0 and config.queue.shutdown_grace == 5.0
    assert config.moderation.roles == (123456789012345678, "Moderators", 42)
    assert config.discord.guild_ids == (123, 456)
    assert config.model.scheduler == "euler-a"
    assert config.generation.sizes == ("64x64", "64x96")
    assert config.storage.path == Path("/tmp/x.db")
    assert config.stats.min_votes == 10
    assert (config.arena.rate, config.arena.max_votes_per_day) == (0.25, 50)
    assert config.prompts.blocklist == ("bad", "two words")
    assert config.prompts.allow_truncation and config.prompts.rating_channels == (42,)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[model]\nscheduler = 'karras'", "model.scheduler: must be one of dpm++, ddim, euler-a"),
        ("[model]\nsafety_checker = 'yes'", "model.safety_checker: must be true or false"),
        ("[generation]\nmax_steps = 'many'", "generation.max_steps: must be a whole number"),
        ("[generation]\nsizes = ['512x500']", "generation.sizes: 512x500: width and height must be multiples of 8"),
        ("[generation]\nmax_count = 9", "generation.max_count: must be between 1 and 4"),
        ("[queue]\nmax_batch = 2", "queue.max_batch: must be at least generation.max_count"),
        ("[discord]\nguild_ids = 5", "discord.guild_ids: must be a list"),
        ("[prompts]\nblocklist = 'bad'", "prompts.blocklist: must be a list of non-empty strings"),
        ("[prompts]\nrating_channels = ['general']", "prompts.rating_channels: must be a list of numeric"),
        ("[discord]\ngateway_url = 'http://x'", "discord.gateway_url: must start with ws:// or wss://"),
        ("[discord]\ntoken = 'secret'", "discord.token: the token must not be in the file"),
        ("[modle]\nid = 'x'", "unknown setting modle"),
        ("[model]\nidd = 'x'", "unknown setting model.idd"),
        ("[model\nid = 'x'", "not valid TOML"),
        ("model = 3", "model: must be a table"),
        ("[queue]\nimages_per_hour = -1", "queue.images_per_hour: must not be negative"),
        ("[queue]\nshutdown_grace = 0", "queue.shutdown_grace: must be between 0 and 3600"),
        ("[moderation]\nroles = 'mods'", "moderation.roles: must be a list of role ids or names"),
        ("[queue]\nserver_share = 0", "queue.server_share: must be more than 0 and at most 1 (a share of max_queue)"),
        ("[queue]\nserver_share = 1.5", "queue.server_share: must be more than 0 and at most 1"),
        ("[queue]\nserver_share = 'half'", "queue.server_share: must be a number"),
        ("[moderation]\nmax_images_per_hour = 0", "moderation.max_images_per_hour: must be at least 1, got 0"),
        ("[moderation]\nmax_queued = 'many'", "moderation.max_queued: must be a whole number"),
        ("[moderation]\nroles = [true]", "moderation.roles: each role must be a role id"),
        ("[engine]\nattention = 'flash'", "engine.attention: must be one of sdpa, xformers, slicing"),
        ("[stats]\nmin_votes = 0", "stats.min_votes: must be at least 1"),
        ("[stats]\nmin_votes = 2.5", "stats.min_votes: must be a whole number"),
        ("[arena]\nrate = 1.5", "arena.rate: must be between 0 and 1"),
        ("[arena]\nmax_votes_per_day = 0", "arena.max_votes_per_day: must be at least 1, got 0"),
        ("[engine]\ncompile = 1", "engine.compile: must be true or false"),
        ("[engine]\nwarmup_batches = [0]", "engine.warmup_batches: each must be between 1 and queue.max_batch (8)"),
        ("[engine]\nwarmup_batches = [9]", "engine.warmup_batches: each must be between 1 and queue.max_batch (8)"),
        ("[engine]\nwarmup_batches = 4", "engine.warmup_batches: must be a list of whole numbers"),
        ("[engine]\nwarmup_sizes = ['512']", 'engine.warmup_sizes: each size must look like "512x768"'),
        ("[engine]\nwarmup_sizes = ['512x500']", "engine.warmup_sizes: 512x500: width and height must be multiples"),
        (
            "[model]\nattention_slicing = true\n[engine]\nattention = 'xformers'",
            "model.attention_slicing: true means engine.attention = slicing",
        ),
    ],
)
def test_bad_settings_name_the_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        Config.load(path, environ=ENV)
    message = str(caught.value)
    assert message.startswith(str(path))
    assert expected in message
    assert "\n" not in message


def test_a_relative_storage_path_is_in_the_config_files_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "deploy").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # where the bot is started from does not matter
    path = tmp_path / "deploy" / "config.toml"
    for text, expected in [
        ("", tmp_path / "deploy" / "sygil.db"),
        ('[storage]\npath = "data/bot.db"\n', tmp_path / "deploy" / "data" / "bot.db"),
        (f'[storage]\npath = "{tmp_path / "bot.db"}"\n', tmp_path / "bot.db"),
    ]:
        path.write_text(text, "utf-8")
        assert Config.load(path, environ=ENV).storage.path == expected
    path.write_text('[model]\nid = "models/tiny"\n', "utf-8")
    assert Config.load(path, environ=ENV).model.id == "models/tiny"  # a hub id or a folder, as written


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        Config.load(tmp_path / "nope.toml", environ=ENV)


def test_missing_token(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    with pytest.raises(ConfigError, match="DISCORD_TOKEN is not set"):
        Config.load(path, environ={})
    assert Config.load(path, environ={}, require_token=False).token == ""


def test_devices_start_one_worker_each_and_the_older_spelling_still_works(tmp_path: Path) -> None:
    config = Config.load(write(tmp_path, '[model]\ndevices = ["cuda:0", "cuda:1", "cpu"]\n'), environ=ENV)
    assert config.model.devices == ("cuda:0", "cuda:1", "cpu")
    assert Config.load(write(tmp_path, '[model]\ndevice = "cpu"\n'), environ=ENV).model.devices == ("cpu",)
    assert Config.load(write(tmp_path, ""), environ=ENV).model.devices == ("auto",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('devices = ["gpu0"]', r"model\.devices: must be one of auto, cpu, cuda, mps \(or cuda:N\), got 'gpu0'"),
        ("devices = []", r"model\.devices: must be a non-empty list of devices"),
        ('devices = ["auto", "cpu"]', r'model\.devices: "auto" \(every GPU, else the CPU\) cannot be combined'),
        ('devices = ["cpu"]\ndevice = "cuda"', r"model\.device: set model\.devices only"),
    ],
)
def test_bad_devices_are_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.load(write(tmp_path, f"[model]\n{text}\n"), environ=ENV)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('name = "gpu/a"', "cluster.name: 1 to 48 letters"),
        ('name = "a:b"', "cluster.name: 1 to 48 letters"),
        ("strikes = 0", "cluster.strikes: must be at least 1"),
        ("max_image_mib = 0", "cluster.max_image_mib and cluster.seconds_per_step: must be more than 0"),
        ("seconds_per_step = -1", "cluster.max_image_mib and cluster.seconds_per_step: must be more than 0"),
    ],
)
def test_cluster_trust_settings_are_checked(tmp_path: Path, section: str, message: str) -> None:
    path = write(tmp_path, f'[cluster]\nbroker = "redis://127.0.0.1:6379/0"\n{section}\n')
    with pytest.raises(ConfigError, match=message):
        Config.load(path, environ={"DISCORD_TOKEN": "t"})


def test_the_cluster_trust_settings_default_to_what_the_example_says() -> None:
    cluster = Config.load(Path("config.example.toml"), environ={"DISCORD_TOKEN": "t"}).cluster
    assert (cluster.max_image_mib, cluster.seconds_per_step, cluster.strikes) == (8.0, 2.0, 3)


COMMIT = "0123456789abcdef0123456789abcdef01234567"
FOLDER_HASH = "sha256:" + "ab" * 32


def test_candidates_are_read_beside_the_production_revision(tmp_path: Path) -> None:
    config = Config.load(write(tmp_path, '[model]\ncandidates = ["refs/pr/4", "/models/sygil-v2"]\n'), environ=ENV)
    assert config.model.candidates == ("refs/pr/4", "/models/sygil-v2")
    assert Config.load(write(tmp_path, ""), environ=ENV).model.candidates == ()
    cluster = f'[model]\nrevision = "{COMMIT}"\ncandidates = ["{FOLDER_HASH}"]\n[cluster]\nbroker = "redis://r"\n'
    assert Config.load(write(tmp_path, cluster), environ=ENV).model.candidates == (FOLDER_HASH,)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[model]\ncandidates = "v2"', "model.candidates: must be a list of revisions of model.id or model folders"),
        ('[model]\ncandidates = ["v2", ""]', "model.candidates: must be a list"),
        ('[model]\ncandidates = ["v2", "v2"]', "model.candidates: 'v2' is listed twice"),
        ('[model]\ncandidates = ["main"]', "model.candidates: 'main' is the production model"),
        (
            '[model]\nid = "{folder}"\ncandidates = ["{folder}/."]',
            "is the production model (model.id and model.revision); list only other revisions",
        ),
        (
            '[model]\ncandidates = ["v2"]\n[cluster]\nbroker = "redis://r"',
            "model.revision: with model.candidates and a cluster, name each revision exactly",
        ),
        (
            f'[model]\nrevision = "{COMMIT}"\ncandidates = ["v2"]\n[cluster]\nbroker = "redis://r"',
            "model.candidates: with model.candidates and a cluster, name each revision exactly",
        ),
        (
            f'[model]\nrevision = "{COMMIT}"\ncandidates = ["{COMMIT[:12]}{"f" * 28}"]\n[cluster]\nbroker = "redis://r"',
            "model.candidates: two revisions start with the same 12 digits",
        ),
    ],
)
def test_bad_candidates_are_named_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "model").mkdir()
    with pytest.raises(ConfigError) as caught:
        Config.load(write(tmp_path, text.replace("{folder}", str(tmp_path / "model"))), environ=ENV)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_vary_and_upscale_strengths_are_read_and_checked(tmp_path: Path) -> None:
    defaults = Config.load(write(tmp_path, ""), environ=ENV)
    assert (defaults.variation.subtle, defaults.variation.strong, defaults.upscale.strength) == (0.35, 0.7, 0.35)
    config = Config.load(
        write(tmp_path, "[variation]\nsubtle = 0.2\nstrong = 1\n[upscale]\nstrength = 0.5\n"), environ=ENV
    )
    assert (config.variation.subtle, config.variation.strong, config.upscale.strength) == (0.2, 1.0, 0.5)
    for text, message in (
        (
            "[variation]\nstrong = 0\n",
            "variation.strong: must be more than 0 and at most 1 (an img2img strength), got 0",
        ),
        ("[upscale]\nstrength = 1.5\n", "upscale.strength: must be more than 0 and at most 1"),
        ('[variation]\nsubtle = "a bit"\n', "variation.subtle: must be a number"),
        ("[upscale]\nfactor = 4\n", "unknown setting upscale.factor"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            Config.load(write(tmp_path, text), environ=ENV)


def test_the_older_variation_strength_becomes_the_subtle_one_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = Config.load(write(tmp_path, "[generation]\nvariation_strength = 0.5\n"), environ=ENV)
    assert (config.variation.subtle, config.variation.strong) == (0.5, 0.7)
    assert "generation.variation_strength is deprecated: it is read as variation.subtle = 0.5" in caplog.text
    caplog.clear()
    both = "[generation]\nvariation_strength = 0.5\n[variation]\nsubtle = 0.3\n"
    config = Config.load(write(tmp_path, both), environ=ENV)
    assert config.variation.subtle == 0.3
    assert "generation.variation_strength is ignored: [variation] sets the strengths" in caplog.text
    with pytest.raises(ConfigError, match=re.escape("generation.variation_strength: must be in (0, 1], got 1.5")):
        Config.load(write(tmp_path, "[generation]\nvariation_strength = 1.5\n"), environ=ENV)


def test_preview_settings_default_to_what_the_example_says_and_reach_the_workers(tmp_path: Path) -> None:
    preview = Config.load(Path("config.example.toml"), environ={"DISCORD_TOKEN": "t"}).preview
    assert preview.options() == PreviewOptions(
        decoder="taesd", taesd="madebyollin/taesd", every=5, min_interval=2.0, max_side=256, quality=70
    )
    path = write(tmp_path, '[preview]\ndecoder = "latent2rgb"\nevery = 3\nmin_interval = 0.5\n')
    options = Config.load(path, environ={"DISCORD_TOKEN": "t"}).preview.options()
    assert options is not None and (options.decoder, options.every, options.min_interval) == ("latent2rgb", 3, 0.5)
    path = write(tmp_path, '[preview]\ndecoder = "off"\n')
    assert Config.load(path, environ={"DISCORD_TOKEN": "t"}).preview.options() is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('decoder = "vae"', "preview.decoder: must be one of taesd, latent2rgb, off, got 'vae'"),
        ("every = 0", "preview.every: must be at least 1"),
        ("every = 2.5", "preview.every: must be a whole number"),
        ("min_interval = -1", "preview.min_interval: must be between 0 and 3600 seconds"),
        ("max_side = 4096", "preview.max_side: must be between 16 and 1024 pixels"),
        ("quality = 0", "preview.quality: must be between 1 and 95"),
        ('taesd = ""', "preview.taesd: must be a non-empty string"),
        ("size = 3", "unknown setting preview.size"),
    ],
)
def test_bad_preview_settings_are_named(tmp_path: Path, section: str, message: str) -> None:
    path = write(tmp_path, f"[preview]\n{section}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.load(path, environ={"DISCORD_TOKEN": "t"})
