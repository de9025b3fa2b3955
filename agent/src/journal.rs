//! Local journal (in progress).
