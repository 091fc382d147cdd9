"""Mixing across real gloo ranks: the exchange and global mixing equal one process mixing the concatenated batch,
send only what must cross, and fail together on bad input; metrics that sync over ranks."""
