//! The `longrun` command line as a library: the binary is `main.rs` around [`cli::run`], and
//! tests reach the commands in-process.

pub mod aws;
pub mod bootstrap;
pub mod call;
pub mod cli;
pub mod dev;
pub mod dlq;
pub mod new;
pub mod secrets;
pub mod tasks;
pub mod usage;
