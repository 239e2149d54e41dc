"""Base models of the factory behind one protocol (`base.BaseModel`), found by name in
`registry`. See `base` for the contract and `registry` for how to add one."""
