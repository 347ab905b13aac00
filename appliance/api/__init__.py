"""HTTP layer: thin aiohttp handlers that parse, call a service, and map results or errors."""
