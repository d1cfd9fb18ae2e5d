"""The payments service: wallets, top-ups and the charge and refund of each order."""
