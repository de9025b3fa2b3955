//! Session (in progress).
