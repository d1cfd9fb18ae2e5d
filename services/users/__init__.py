"""The users service: accounts, and their created/updated/deleted events."""
