"""The HTTP/JSON gateway: REST routes from google.api.http, auth, limits, live events."""
