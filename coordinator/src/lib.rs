//! FaaSNet coordinator (placeholder; see issue 3).
