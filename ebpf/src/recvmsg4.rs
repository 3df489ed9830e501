//! `cgroup/recvmsg4`: a UDP reply from a backend the socket reached through a VIP is shown as
//! coming from the VIP.

use aya_ebpf::{
    helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
    EbpfContext,
};
use berth_ebpf_common::ReverseKey;

use crate::maps::UDP_REVERSE;

/// Rewrites the source address `recvfrom()`/`recvmsg()` report. Must return 1 (the kernel rejects
/// anything else for this hook).
#[cgroup_sock_addr(recvmsg4)]
pub fn berth_recvmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` for the duration of the call.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: `bpf_get_socket_cookie` accepts the sock_addr context these programs get.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = ReverseKey {
        cookie,
        ip: sa.user_ip4,
        port: sa.user_port,
    };
    // SAFETY: the value is copied out at once.
    if let Some(flow) = unsafe { UDP_REVERSE.get(&key) }.copied() {
        sa.user_ip4 = flow.vip;
        sa.user_port = flow.port;
    }
    1
}
