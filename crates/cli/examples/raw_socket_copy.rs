//! The baseline for migration throughput: copy a buffer from memory to memory through one
//! socket, as fast as plain `write`/`read` of 1 MiB go, with nothing else on the path.
//!
//! ```text
//! cargo run --release -p vfio-mig --example raw_socket_copy -- [SIZE_MIB] [unix|tcp] [HOPS]
//! ```
//!
//! Both buffers (`SIZE_MIB` MiB, default 1024) are allocated and touched before the clock
//! starts, like a membuf's state; a sender thread writes its buffer in 1 MiB pieces, the
//! receiver reads into its own. `unix` (default) is a UNIX stream socket pair; `tcp` is a
//! loopback TCP connection. With `HOPS` > 1 (default 1) the bytes cross that many sockets in
//! a chain, each relay thread reading 1 MiB and writing it on: the shape of a migration
//! between two vfio-user servers, whose orchestrator sits between them (2 hops, 3 with the
//! socket pair of a local migration). Prints one line: bytes, seconds, MiB/s.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Instant;

const CHUNK: usize = 1 << 20;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let mib: usize = match args.next() {
        Some(s) => s.parse().map_err(|_| bad_usage(&s))?,
        None => 1024,
    };
    let kind = args.next().unwrap_or_else(|| "unix".into());
    let hops: usize = match args.next() {
        Some(s) => s
            .parse()
            .ok()
            .filter(|&h| h >= 1)
            .ok_or_else(|| bad_usage(&s))?,
        None => 1,
    };
    let size = mib << 20;

    // Distinct, touched contents on both sides, so no page is faulted in while timing.
    let source: Vec<u8> = (0..size).map(|i| (i / 4096) as u8 ^ (i as u8)).collect();
    let mut destination = vec![0xa5u8; size];

    let mut links = Vec::with_capacity(hops);
    for _ in 0..hops {
        links.push(connect(&kind)?);
    }
    let (mut tx, first_rx) = links.remove(0);
    // Relay i reads from link i and writes into link i + 1; the receiver reads the last.
    let mut relays = Vec::new();
    let mut rx = first_rx;
    for (next_tx, next_rx) in links {
        relays.push((rx, next_tx));
        rx = next_rx;
    }

    let start = Instant::now();
    let elapsed = thread::scope(|s| {
        let sender = s.spawn(|| -> std::io::Result<()> {
            for piece in source.chunks(CHUNK) {
                tx.write_all(piece)?;
            }
            tx.flush()
        });
        let relays: Vec<_> = relays
            .into_iter()
            .map(|(mut from, mut to)| {
                s.spawn(move || -> std::io::Result<()> {
                    let mut buf = vec![0u8; CHUNK];
                    let mut left = size;
                    while left > 0 {
                        let n = from.read(&mut buf[..CHUNK.min(left)])?;
                        if n == 0 {
                            return Err(std::io::ErrorKind::UnexpectedEof.into());
                        }
                        to.write_all(&buf[..n])?;
                        left -= n;
                    }
                    to.flush()
                })
            })
            .collect();
        for piece in destination.chunks_mut(CHUNK) {
            rx.read_exact(piece)?;
        }
        let elapsed = start.elapsed();
        sender.join().expect("sender thread")?;
        for relay in relays {
            relay.join().expect("relay thread")?;
        }
        Ok::<_, std::io::Error>(elapsed)
    })?;
    assert!(source == destination, "the copy differs from the source");

    let secs = elapsed.as_secs_f64();
    println!(
        "raw {kind} socket copy, {hops} hop(s): {size} bytes in {secs:.3} s: {:.1} MiB/s",
        size as f64 / secs / f64::from(1u32 << 20)
    );
    Ok(())
}

type Link = (Box<dyn Write + Send>, Box<dyn Read + Send>);

/// A connected pair of the given kind: (writing end, reading end).
fn connect(kind: &str) -> std::io::Result<Link> {
    match kind {
        "unix" => {
            let (a, b) = UnixStream::pair()?;
            Ok((Box::new(a), Box::new(b)))
        }
        "tcp" => {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let a = TcpStream::connect(listener.local_addr()?)?;
            let (b, _) = listener.accept()?;
            Ok((Box::new(a), Box::new(b)))
        }
        other => Err(bad_usage(other)),
    }
}

fn bad_usage(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("'{what}': usage: raw_socket_copy [SIZE_MIB] [unix|tcp] [HOPS]"),
    )
}
