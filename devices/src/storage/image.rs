//! Image formats (placeholder while the module is written).
