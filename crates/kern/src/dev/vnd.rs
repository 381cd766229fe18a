//! vnd
