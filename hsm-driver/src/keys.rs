//! (being written; see docs/design/foundation.md)
