//! nftables batches applied in-process through `libnftables.so.1` (what `nft` itself is a thin
//! shell around), loaded with `dlopen` so nothing is needed at build time. This saves spawning
//! `nft` for every endpoint change, most of an endpoint's setup time. Where the library cannot be
//! loaded, callers fall back to the `nft` binary.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::{Mutex, OnceLock};

/// `NFT_CTX_DEFAULT`.
const NFT_CTX_DEFAULT: u32 = 0;
/// `NFT_CTX_OUTPUT_JSON`: with it set, input is parsed as JSON as well (what `nft -j` does).
const NFT_CTX_OUTPUT_JSON: c_uint = 1 << 4;

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type SetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
type CtxInt = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxStr = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

struct Api {
    ctx_new: CtxNew,
    output_set_flags: SetFlags,
    buffer_output: CtxInt,
    buffer_error: CtxInt,
    get_error_buffer: CtxStr,
    run_cmd_from_buffer: RunCmd,
}

/// One context for the whole process, used under a lock: libnftables' first `nft_ctx_new`
/// initialises globals without synchronisation, and a context is not to be shared by threads.
struct Context {
    api: Api,
    ctx: *mut c_void,
}

// SAFETY: the context is only ever used while holding the mutex around it.
unsafe impl Send for Context {}

fn load() -> Option<Context> {
    // SAFETY: dlopen/dlsym with NUL-terminated names; every symbol is checked for null before
    // being transmuted to the signature libnftables.h declares for it.
    unsafe {
        let lib = libc::dlopen(
            c"libnftables.so.1".as_ptr(),
            libc::RTLD_NOW | libc::RTLD_LOCAL,
        );
        if lib.is_null() {
            return None;
        }
        macro_rules! sym {
            ($name:literal, $ty:ty) => {{
                let p = libc::dlsym(lib, $name.as_ptr());
                if p.is_null() {
                    return None;
                }
                std::mem::transmute::<*mut c_void, $ty>(p)
            }};
        }
        let api = Api {
            ctx_new: sym!(c"nft_ctx_new", CtxNew),
            output_set_flags: sym!(c"nft_ctx_output_set_flags", SetFlags),
            buffer_output: sym!(c"nft_ctx_buffer_output", CtxInt),
            buffer_error: sym!(c"nft_ctx_buffer_error", CtxInt),
            get_error_buffer: sym!(c"nft_ctx_get_error_buffer", CtxStr),
            run_cmd_from_buffer: sym!(c"nft_run_cmd_from_buffer", RunCmd),
        };
        let ctx = (api.ctx_new)(NFT_CTX_DEFAULT);
        if ctx.is_null() {
            return None;
        }
        (api.output_set_flags)(ctx, NFT_CTX_OUTPUT_JSON);
        // Buffered: nothing is printed on the agent's stdout/stderr.
        (api.buffer_output)(ctx);
        (api.buffer_error)(ctx);
        Some(Context { api, ctx })
    }
}

fn context() -> Option<&'static Mutex<Context>> {
    static CONTEXT: OnceLock<Option<Mutex<Context>>> = OnceLock::new();
    CONTEXT
        .get_or_init(|| {
            if std::env::var_os("MIREN_NFT_BINARY").is_some() {
                return None; // forced fallback, for comparisons
            }
            load().map(Mutex::new)
        })
        .as_ref()
}

/// Applies a JSON batch in one transaction. `None` when libnftables is not available (the
/// caller runs `nft` instead); otherwise the outcome, with nft's message on failure.
/// Blocking: call from a blocking context.
pub fn apply_json(payload: &str) -> Option<Result<(), String>> {
    let lock = context()?;
    let buf = match CString::new(payload) {
        Ok(buf) => buf,
        Err(_) => return Some(Err("the batch contains a NUL byte".into())),
    };
    let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: a live context used under its lock; `buf` outlives the call; the error buffer is
    // owned by the context and copied before the lock is released.
    unsafe {
        let rc = (guard.api.run_cmd_from_buffer)(guard.ctx, buf.as_ptr());
        let err = (guard.api.get_error_buffer)(guard.ctx);
        let message = if err.is_null() {
            String::new()
        } else {
            CStr::from_ptr(err).to_string_lossy().trim().to_string()
        };
        Some(if rc == 0 {
            Ok(())
        } else if message.is_empty() {
            Err(format!("libnftables returned {rc}"))
        } else {
            Err(message)
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn loads_when_installed() {
        // The library is a dependency of Debian's nft: when `nft` exists, so does it.
        if std::path::Path::new("/usr/sbin/nft").exists() {
            assert!(super::context().is_some(), "libnftables.so.1 did not load");
        }
    }
}
