//! The integration tests: one binary driving real berthd processes, runc and busybox containers.
//! Each module is one area; `common` is the shared fixture.

#[macro_use]
mod common;

mod cancel;
mod checkpoint;
mod claims;
mod errors;
mod events;
mod exits;
mod fifo_stdio;
mod first_instant;
mod interop;
mod lifecycle;
mod limits;
mod process;
mod raw_http2;
mod recovery;
mod restart;
mod service;
mod stats;
mod terminal;
mod trust;
mod upgrade;
