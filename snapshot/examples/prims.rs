//! Measures the building blocks of a backup on one core (thread CPU time, robust to load):
//! zstd at several levels on a file's 4 MiB windows, BLAKE3, and reading.
//! `prims FILE...`
use std::time::Instant;
fn cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
fn main() {
    for f in std::env::args().skip(1) {
        let data = std::fs::read(&f).unwrap();
        let mb = data.len() as f64 / 1e6;
        let (c0, w0) = (cpu(), Instant::now());
        for w in data.chunks(4 << 20) {
            std::hint::black_box(blake3::hash(w));
        }
        println!(
            "{f}: blake3 {:.0} MB/s cpu ({:.3}s wall)",
            mb / (cpu() - c0),
            w0.elapsed().as_secs_f64()
        );
        for level in [1, -1, -2, -3, -5, -10] {
            let mut c = zstd::bulk::Compressor::new(level).unwrap();
            c.include_checksum(true).unwrap();
            let (c0, mut out) = (cpu(), 0usize);
            for w in data.chunks(4 << 20) {
                out += c.compress(w).unwrap().len();
            }
            println!(
                "{f}: zstd {level:>3} {:.0} MB/s cpu ratio {:.3}",
                mb / (cpu() - c0),
                out as f64 / data.len() as f64
            );
        }
    }
}
