"""The inventory service: products, their stock and the reservations the order saga makes."""
