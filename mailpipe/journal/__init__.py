"""The journal: per-message delivery state that makes re-fetching harmless."""
