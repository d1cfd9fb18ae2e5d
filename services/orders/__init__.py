"""The orders service: places orders and orchestrates the order saga."""
