"""The cluster mode: GPU workers on other hosts take batches through Redis Streams (see ``wire`` for the keys).

The bot keeps admission, limits, fairness, batching and SQLite; Redis carries only work in flight. With no broker
configured nothing here runs: the bot starts its own worker processes.
"""
