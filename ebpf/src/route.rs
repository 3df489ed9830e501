//! The service lookup shared by the sock_addr programs.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use berth_ebpf_common::BackendKey;

use crate::maps::{BACKENDS, SERVICES};

/// What to do with a destination address.
pub enum Route {
    /// Not a service VIP: leave the address alone.
    Pass,
    /// A VIP: use this backend address (network order) instead.
    Backend(u32),
    /// A VIP without a usable backend: refuse the call rather than send to the VIP.
    Refuse,
}

/// Picks a backend of `ip` at random if `ip` is a VIP.
#[inline(always)]
pub fn route(ip: u32) -> Route {
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    let Some(service) = (unsafe { SERVICES.get(&ip) }).copied() else {
        return Route::Pass;
    };
    if service.backend_count == 0 {
        return Route::Refuse;
    }
    // SAFETY: a BPF helper without arguments or side effects.
    let random = unsafe { bpf_get_prandom_u32() };
    let key = BackendKey {
        service_id: service.service_id,
        index: random % service.backend_count,
    };
    // SAFETY: as above, copied out at once.
    match unsafe { BACKENDS.get(&key) } {
        Some(ip) => Route::Backend(*ip),
        // The agent writes slots before raising the count, so this is only a slot removed
        // between our two lookups: refuse rather than leak the VIP.
        None => Route::Refuse,
    }
}
