"""The recipes layer: the concrete model kinds the generic trainer trains (`kinds`)."""
