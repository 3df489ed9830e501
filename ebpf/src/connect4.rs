//! `cgroup/connect4`: TCP (and connected UDP) sockets aimed at a VIP connect to a backend instead.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{
    route::{route, Route},
    sendmsg4::remember_udp_flow,
};

/// `SOCK_DGRAM`.
const SOCK_DGRAM: u32 = 2;

/// Rewrites the destination of `connect()` to a VIP; returns 0 (EPERM to the caller) when the VIP
/// has no backend.
#[cgroup_sock_addr(connect4)]
pub fn berth_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` for the duration of the call.
    let sa = unsafe { &mut *ctx.sock_addr };
    let vip = sa.user_ip4;
    match route(vip) {
        Route::Pass => 1,
        Route::Refuse => 0,
        Route::Backend(ip) => {
            sa.user_ip4 = ip;
            if sa.type_ == SOCK_DGRAM {
                // A connected UDP socket read with recvfrom() would otherwise see the backend.
                remember_udp_flow(&ctx, ip, sa.user_port, vip);
            }
            1
        }
    }
}
