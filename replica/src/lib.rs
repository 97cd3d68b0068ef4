//! lockstep replica runtime.
pub mod storage;
