//! Test support: start the real `pcrd` binary on a temporary store and talk to it.
