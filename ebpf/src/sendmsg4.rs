//! `cgroup/sendmsg4`: UDP datagrams sent to a VIP go to a backend; the flow is remembered so that
//! `recvmsg4` can show the reply as coming from the VIP.

use aya_ebpf::{
    helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
    EbpfContext,
};
use berth_ebpf_common::{ReverseKey, ReverseValue};

use crate::{
    maps::UDP_REVERSE,
    route::{route, Route},
};

/// Rewrites the destination of `sendto()`/`sendmsg()` to a VIP; refuses (EPERM) when the VIP has
/// no backend.
#[cgroup_sock_addr(sendmsg4)]
pub fn berth_sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` for the duration of the call.
    let sa = unsafe { &mut *ctx.sock_addr };
    let vip = sa.user_ip4;
    match route(vip) {
        Route::Pass => 1,
        Route::Refuse => 0,
        Route::Backend(ip) => {
            sa.user_ip4 = ip;
            remember_udp_flow(&ctx, ip, sa.user_port, vip);
            1
        }
    }
}

/// Records (socket, backend, port) → VIP. A full map evicts the oldest flow (LRU), which at worst
/// shows one late reply with the backend's address.
#[inline(always)]
pub fn remember_udp_flow(ctx: &SockAddrContext, backend: u32, port: u32, vip: u32) {
    // SAFETY: `bpf_get_socket_cookie` accepts the sock_addr context these programs get.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = ReverseKey {
        cookie,
        ip: backend,
        port,
    };
    let value = ReverseValue { vip, port };
    // Nothing useful to do on failure: the datagram still goes to the backend.
    let _ = UDP_REVERSE.insert(&key, &value, 0);
}
