//! berth's eBPF programs, one file per attach point:
//!
//! - `connect4`, `sendmsg4`, `recvmsg4`: service routing on the cgroup2 directory holding the
//!   node's containers; a socket aimed at a service VIP is pointed at one backend before any packet
//!   leaves, and UDP replies are made to look like they came from the VIP.
//! - `tc_ingress`, `tc_egress` (shared code in `tc`): network isolation and per-instance counters
//!   on each instance's host-side veth.
//!
//! Maps are in `maps.rs`, their key/value types in `berth-ebpf-common`. Never `std`.
#![no_std]
#![no_main]

mod connect4;
mod maps;
mod recvmsg4;
mod route;
mod sendmsg4;
mod tc;
mod tc_egress;
mod tc_ingress;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never called at run time.
    loop {}
}

/// The kernel refuses GPL-only helpers to programs of other licenses; berth's are Apache-2.0 and
/// use none of them, but the section must name a license.
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
