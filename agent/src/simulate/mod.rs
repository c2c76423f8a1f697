//! Blast-radius simulator.
