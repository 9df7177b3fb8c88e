"""Graph rewrites, one module a rewrite. A pass takes a GraphModule and its decision and returns a
GraphModule plus a record of what it changed; it never solves anything."""

__all__: list[str] = []
