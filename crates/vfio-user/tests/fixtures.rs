//! Replays the byte-exact libvfio-user recordings in `shared/fixtures/vfio-user/`: every
//! whole message decodes and re-encodes to the same bytes (through both the `Vec` path and
//! the zero-copy head + bulk path), every reply answers its request, and truncated records
//! still frame correctly.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;

use vfio_mig_uapi::Errno;
use vfio_mig_vfio_user::codec::{
    data_prefix_len, message_len, Body, CodecError, Command, DmaAccess, FeatureData, HeadBuf,
    Header, Limits, Message, MessageKind, MigDataReadRequest, Payload, RegionAccess, Reply,
    Request, HEADER_SIZE,
};

#[derive(Debug)]
struct Record {
    file: String,
    line: usize,
    conn: String,
    dir: String,
    msg_id: u16,
    cmd: u16,
    cmd_name: String,
    flags: u32,
    error: u32,
    size: u32,
    nfds: usize,
    bytes: Vec<u8>,
    truncated: bool,
}

impl Record {
    fn at(&self) -> String {
        format!(
            "{}:{} ({} {} {})",
            self.file, self.line, self.dir, self.cmd_name, self.msg_id
        )
    }
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/vfio-user")
}

fn load() -> Vec<Vec<Record>> {
    let dir = fixture_dir();
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "fixture directory {} is missing ({e}); it holds the libvfio-user recordings this \
             test replays",
            dir.display()
        )
    });
    let mut paths: Vec<PathBuf> = entries
        .map(|e| e.expect("read fixture dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no .jsonl fixtures in {}", dir.display());
    paths
        .iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(path).expect("read fixture");
            let records: Vec<Record> = text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| parse_record(&name, i + 1, l))
                .collect();
            assert!(!records.is_empty(), "{name} has no records");
            records
        })
        .collect()
}

fn parse_record(file: &str, line: usize, text: &str) -> Record {
    let v: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{file}:{line}: bad JSON: {e}"));
    let int = |k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("{file}:{line}: missing integer {k}"))
    };
    let string = |k: &str| {
        v[k].as_str()
            .unwrap_or_else(|| panic!("{file}:{line}: missing string {k}"))
            .to_owned()
    };
    Record {
        file: file.to_owned(),
        line,
        conn: string("conn"),
        dir: string("dir"),
        msg_id: int("msg_id") as u16,
        cmd: int("cmd") as u16,
        cmd_name: string("cmd_name"),
        flags: int("flags") as u32,
        error: int("error") as u32,
        size: int("size") as u32,
        nfds: int("nfds") as usize,
        bytes: hex::decode(string("hex")).unwrap_or_else(|e| panic!("{file}:{line}: hex: {e}")),
        truncated: v["truncated"].as_bool().unwrap_or(false),
    }
}

/// Re-encodes `msg` both ways and compares with the recorded bytes.
fn assert_reencodes(rec: &Record, msg: &Message<'_>) {
    let mut out = Vec::new();
    msg.encode(&mut out)
        .unwrap_or_else(|e| panic!("{}: encode: {e}", rec.at()));
    assert_eq!(
        hex::encode(&out),
        hex::encode(&rec.bytes),
        "{}: re-encoding differs",
        rec.at()
    );
    assert_eq!(msg.encoded_len(), rec.bytes.len(), "{}", rec.at());

    let header = msg.header().unwrap();
    let kind = header.kind().unwrap();
    let Ok(cmd) = header.command() else {
        return;
    };
    if let (Some(prefix), false) = (data_prefix_len(cmd, kind), header.is_error()) {
        let mut head = HeadBuf::new();
        let bulk = msg.encode_head(&mut head).unwrap();
        assert_eq!(head.len(), HEADER_SIZE + prefix, "{}", rec.at());
        let mut joined = head.as_bytes().to_vec();
        joined.extend_from_slice(bulk.data);
        joined.resize(joined.len() + bulk.padding, 0);
        assert_eq!(joined, rec.bytes, "{}: head + bulk differs", rec.at());
        // The bulk data is borrowed from the received bytes, not copied.
        if !bulk.data.is_empty() {
            let start = head.len();
            assert!(
                std::ptr::eq(bulk.data.as_ptr(), rec.bytes[start..].as_ptr()),
                "{}: bulk data was copied",
                rec.at()
            );
        }
    }
}

/// Checks what a truncated record still allows: the header, framing, and the fixed prefix
/// of a data-carrying message.
fn check_truncated(rec: &Record, limits: &Limits) {
    assert!(rec.bytes.len() < rec.size as usize, "{}", rec.at());
    let header = Header::decode(&rec.bytes).unwrap();
    assert_eq!(header.msg_size, rec.size, "{}", rec.at());
    assert_eq!(
        message_len(&rec.bytes, limits).unwrap(),
        Some(rec.size as usize),
        "{}",
        rec.at()
    );
    let kind = header.check(limits).unwrap();
    let cmd = header.command().unwrap();
    let prefix = data_prefix_len(cmd, kind)
        .unwrap_or_else(|| panic!("{}: truncated record without bulk data", rec.at()));
    let fixed = &rec.bytes[HEADER_SIZE..HEADER_SIZE + prefix];
    let data_len = rec.size as usize - HEADER_SIZE - prefix;
    match cmd {
        Command::RegionRead | Command::RegionWrite => {
            let a = RegionAccess::decode(fixed, limits).unwrap();
            assert_eq!(a.count as usize, data_len, "{}", rec.at());
        }
        Command::DmaRead | Command::DmaWrite => {
            let a = DmaAccess::decode(fixed, limits).unwrap();
            assert_eq!(a.count as usize, data_len, "{}", rec.at());
        }
        Command::MigDataRead | Command::MigDataWrite => {
            let a = MigDataReadRequest::decode(fixed, limits).unwrap();
            assert!(a.size as usize <= data_len, "{}", rec.at());
            assert_eq!(a.argsz as usize, prefix + a.size as usize, "{}", rec.at());
        }
        _ => unreachable!(),
    }
    // A decoder given only part of a message refuses it.
    assert!(matches!(
        Message::decode(&rec.bytes, limits),
        Err(CodecError::LengthMismatch { .. })
    ));
}

#[derive(Default)]
struct Stats {
    decoded: usize,
    truncated: usize,
    pairs: usize,
    error_replies: usize,
    error_echoes: usize,
    padded_mig_reads: usize,
    by_command: BTreeMap<(String, &'static str), usize>,
}

#[test]
fn every_recorded_message_round_trips_and_replies_answer_requests() {
    let limits = Limits::default();
    let mut stats = Stats::default();
    for records in load() {
        // Open requests by (conn, direction, msg_id, cmd), oldest first.
        let mut open: HashMap<(String, String, u16, u16), VecDeque<usize>> = HashMap::new();
        for (i, rec) in records.iter().enumerate() {
            let header = Header::decode(&rec.bytes).unwrap();
            assert_eq!(
                (
                    header.msg_id,
                    header.cmd,
                    header.flags,
                    header.error,
                    header.msg_size
                ),
                (rec.msg_id, rec.cmd, rec.flags, rec.error, rec.size),
                "{}: header fields differ from the record",
                rec.at()
            );
            limits.check_fds(rec.nfds).unwrap();
            if let Ok(cmd) = header.command() {
                assert_eq!(cmd.name(), rec.cmd_name, "{}", rec.at());
            }
            if rec.nfds > 0 {
                let cmd = header.command().unwrap();
                assert!(
                    matches!(
                        cmd,
                        Command::DmaMap | Command::DeviceSetIrqs | Command::DeviceGetRegionInfo
                    ),
                    "{}: fds on an unexpected command",
                    rec.at()
                );
            }
            let kind = header.check(&limits).unwrap();
            let request_index = match kind {
                MessageKind::Command => {
                    open.entry((rec.conn.clone(), rec.dir.clone(), rec.msg_id, rec.cmd))
                        .or_default()
                        .push_back(i);
                    None
                }
                MessageKind::Reply => {
                    let other = if rec.dir == "c2s" { "s2c" } else { "c2s" };
                    let q = open
                        .get_mut(&(rec.conn.clone(), other.to_owned(), rec.msg_id, rec.cmd))
                        .and_then(VecDeque::pop_front);
                    Some(q.unwrap_or_else(|| panic!("{}: reply without a request", rec.at())))
                }
            };
            if rec.truncated {
                check_truncated(rec, &limits);
                stats.truncated += 1;
                continue;
            }
            assert_eq!(rec.bytes.len(), rec.size as usize, "{}", rec.at());
            assert_eq!(
                message_len(&rec.bytes, &limits).unwrap(),
                Some(rec.bytes.len())
            );

            let msg = match Message::decode(&rec.bytes, &limits) {
                Ok(m) => m,
                Err(CodecError::UnknownCommand(n)) => {
                    // The probe's command 99: the server must still be able to answer it,
                    // and the answer libvfio-user sent is exactly ours.
                    assert_eq!(n, rec.cmd);
                    let answer = &records[i + 1];
                    let ours = Message::error_reply(&header, Errno::EINVAL);
                    let mut out = Vec::new();
                    ours.encode(&mut out).unwrap();
                    assert_eq!(out, answer.bytes, "{}: error reply differs", rec.at());
                    assert_eq!(
                        Header::error_reply_to(&header, Errno::EINVAL).to_bytes()[..],
                        out
                    );
                    stats.decoded += 1;
                    continue;
                }
                Err(e) => panic!("{}: decode failed: {e:?}", rec.at()),
            };
            assert_eq!(msg.msg_id, rec.msg_id);
            assert_reencodes(rec, &msg);
            stats.decoded += 1;
            let name = match &msg.body {
                Body::Request(r) => r.command().name(),
                Body::Reply(r) => r.command().name(),
                Body::Error(_) => "error",
            };
            *stats.by_command.entry((rec.dir.clone(), name)).or_default() += 1;

            let Some(req_i) = request_index else {
                continue;
            };
            stats.pairs += 1;
            let req_rec = &records[req_i];
            match &msg.body {
                Body::Error(e) => {
                    stats.error_replies += 1;
                    assert_eq!(e.errno(), Errno::EINVAL, "{}", rec.at());
                    if !e.payload.is_empty() {
                        // libvfio-user echoes the request payload of failed feature SETs.
                        assert_eq!(e.payload, &req_rec.bytes[HEADER_SIZE..], "{}", rec.at());
                        stats.error_echoes += 1;
                    }
                }
                Body::Reply(_) if req_rec.truncated => {
                    // Only the request's prefix was recorded; framing was checked above.
                }
                Body::Reply(reply) => {
                    let req_msg = Message::decode(&req_rec.bytes, &limits).unwrap();
                    let Body::Request(request) = &req_msg.body else {
                        panic!("{}: request is not a command", req_rec.at())
                    };
                    reply
                        .check_answers(request)
                        .unwrap_or_else(|e| panic!("{}: {e}", rec.at()));
                    check_quirks(rec, request, reply, &mut stats);
                }
                Body::Request(_) => unreachable!("a reply decoded as a request"),
            }
        }
        for ((conn, dir, id, cmd), q) in open {
            assert!(
                q.is_empty(),
                "unanswered {conn} {dir} msg_id {id} cmd {cmd}: {q:?}"
            );
        }
    }
    println!(
        "decoded {} whole messages ({} request/reply pairs, {} error replies of which {} echo \
         the request, {} padded MIG_DATA_READ replies), {} truncated records",
        stats.decoded,
        stats.pairs,
        stats.error_replies,
        stats.error_echoes,
        stats.padded_mig_reads,
        stats.truncated
    );
    for ((dir, name), n) in &stats.by_command {
        println!("  {dir} {name}: {n}");
    }
    // The recordings are what the README says they are.
    assert!(stats.decoded > 700, "{}", stats.decoded);
    assert_eq!(stats.truncated, 9);
    assert_eq!(stats.error_replies, 16);
    // The gpio probe's failed SETs of ERROR, RUNNING_P2P, and PRE_COPY from STOP_COPY.
    assert_eq!(stats.error_echoes, 3);
    // The 8-byte end of the stop-copy stream and the gpio's 0-byte end of data (the
    // large files' padded replies are truncated records).
    assert_eq!(stats.padded_mig_reads, 2);
    for cmd in Command::ALL {
        let seen = stats.by_command.keys().any(|(_, n)| *n == cmd.name());
        let recorded = !matches!(
            cmd,
            Command::DeviceGetRegionIoFds | Command::DirtyPages | Command::RegionWriteMulti
        );
        assert_eq!(seen, recorded, "{cmd}");
    }
}

/// libvfio-user behaviour the README documents, checked on the decoded values.
fn check_quirks(rec: &Record, request: &Request<'_>, reply: &Reply<'_>, stats: &mut Stats) {
    match (request, reply) {
        (Request::MigDataRead(q), Reply::MigDataRead(p)) => {
            // Replies are sized for the requested amount; argsz/size give the real one.
            assert_eq!(
                p.data.len() + p.padding as usize,
                q.size as usize,
                "{}",
                rec.at()
            );
            assert_eq!(p.argsz as usize, 8 + p.data.len(), "{}", rec.at());
            if p.padding > 0 {
                stats.padded_mig_reads += 1;
            }
        }
        (Request::DeviceFeature(q), Reply::DeviceFeature(p)) => {
            if let (
                FeatureData::MigDeviceState { data_fd: qfd, .. },
                FeatureData::MigDeviceState { data_fd: pfd, .. },
            ) = (&q.data, &p.data)
            {
                // GET replies carry data_fd 0, SET replies echo the request's.
                let expected = if q.is_get() { 0 } else { *qfd };
                assert_eq!(*pfd, expected, "{}", rec.at());
            }
            if q.is_set() || q.is_probe() {
                assert_eq!(q, p, "{}: SET/PROBE reply must echo the request", rec.at());
            }
        }
        (Request::DmaUnmap(q), Reply::DmaUnmap(p)) => {
            assert_eq!(
                Some(*q),
                *p,
                "{}: DMA_UNMAP reply echoes the request",
                rec.at()
            );
        }
        _ => {}
    }
}
