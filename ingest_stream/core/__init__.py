"""Pure logic: no Faust, no Kafka client, no drivers, no asyncio. Time and randomness are parameters."""
