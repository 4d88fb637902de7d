"""The storage engine: the Store and the parts it is composed of."""
