"""The commands a user types, one file each (a Config dataclass and run(cfg)); they import only the library."""
