"""The core of sygil-bot: prompts, engine, scheduler, cluster, storage; Discord only in client.py and cli/run.py."""
