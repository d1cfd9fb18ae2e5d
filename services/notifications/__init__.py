"""The notifications service: stores a message for a user per event about them."""
