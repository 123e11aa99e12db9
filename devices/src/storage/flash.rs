//! Flash and dump (placeholder while the module is written).
