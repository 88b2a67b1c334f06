//! Drives the client against libvfio-user's recorded answers.
//!
//! A fake server thread serves a script of recorded exchanges from
//! `shared/fixtures/vfio-user/`: for each request the client sends, it checks that the bytes
//! after the header are exactly the recorded request's (so the client speaks the way
//! libvfio-user's own clients do), and answers with the recorded reply, its msg_id rewritten
//! to the client's. The tests then check that the client interprets each reply as
//! libvfio-user meant it: padded MIG_DATA_READ replies, error replies with a payload,
//! `data_fd` 0 in GET replies, region-info and IRQ-info layouts, dirty bitmaps.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use vfio_mig_device::{MigrationDevice, ReadOutcome, StreamDirection};
use vfio_mig_uapi::{DeviceState, Errno, MigrationFeatures};
use vfio_mig_vfio_user::client::{Client, ClientError, ClientOptions, RemoteDevice};
use vfio_mig_vfio_user::codec::{Command, Header, Limits, HEADER_SIZE};
use vfio_mig_vfio_user::socket::{Connection, SocketError};

/// One message of a recording.
#[derive(Clone, Debug)]
struct Rec {
    dir: String,
    msg_id: u16,
    cmd: u16,
    bytes: Vec<u8>,
}

struct Recording {
    name: &'static str,
    recs: Vec<Rec>,
}

impl Recording {
    fn load(name: &'static str) -> Recording {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/fixtures/vfio-user")
            .join(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("fixture {} is missing: {e}", path.display()));
        let recs = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert!(v.get("truncated").is_none(), "{name}: truncated record");
                Rec {
                    dir: v["dir"].as_str().unwrap().to_owned(),
                    msg_id: v["msg_id"].as_u64().unwrap() as u16,
                    cmd: v["cmd"].as_u64().unwrap() as u16,
                    bytes: hex::decode(v["hex"].as_str().unwrap()).unwrap(),
                }
            })
            .collect();
        Recording { name, recs }
    }

    /// The exchange whose request is record `index` (a `c2s` command): the request and the
    /// first later `s2c` reply with the same msg_id and command.
    fn at(&self, index: usize) -> Step {
        let request = &self.recs[index];
        assert_eq!(request.dir, "c2s", "{}:{index} is not a request", self.name);
        let reply = self.recs[index + 1..]
            .iter()
            .find(|r| r.dir == "s2c" && r.msg_id == request.msg_id && r.cmd == request.cmd)
            .unwrap_or_else(|| panic!("{}:{index} has no reply", self.name));
        Step {
            label: format!("{}:{index} (msg {})", self.name, request.msg_id),
            request: request.bytes.clone(),
            reply: reply.bytes.clone(),
        }
    }

    /// The exchange of the request with this msg_id (ids must be unique in the recording).
    fn id(&self, msg_id: u16) -> Step {
        let mut found = self
            .recs
            .iter()
            .enumerate()
            .filter(|(_, r)| r.dir == "c2s" && r.msg_id == msg_id);
        let (index, _) = found.next().expect("no such msg_id");
        assert!(found.next().is_none(), "msg_id {msg_id} is not unique");
        self.at(index)
    }

    fn ids(&self, ids: impl IntoIterator<Item = u16>) -> Vec<Step> {
        ids.into_iter().map(|i| self.id(i)).collect()
    }

    fn indices(&self, indices: impl IntoIterator<Item = usize>) -> Vec<Step> {
        indices.into_iter().map(|i| self.at(i)).collect()
    }

    /// The reply to the recording's VERSION.
    fn version_reply(&self) -> Vec<u8> {
        let i = self
            .recs
            .iter()
            .position(|r| r.dir == "c2s" && r.cmd == Command::Version.raw())
            .unwrap();
        self.at(i).reply
    }
}

/// One scripted exchange.
#[derive(Clone)]
struct Step {
    label: String,
    request: Vec<u8>,
    reply: Vec<u8>,
}

/// Serves `version_reply` to the client's VERSION, then `steps` in order; panics (dropping
/// the connection) on any request that differs from the script. Returns how many steps ran.
fn fake_server(stream: UnixStream, version_reply: Vec<u8>, steps: Vec<Step>) -> JoinHandle<usize> {
    thread::spawn(move || {
        let mut conn = Connection::new(stream);
        let limits = Limits::default();
        let answer = |conn: &mut Connection, request: &Header, recorded: &[u8]| {
            let mut reply = recorded.to_vec();
            reply[..2].copy_from_slice(&request.msg_id.to_le_bytes());
            conn.send(&reply, &[], 0, &[]).unwrap();
        };
        let got = conn.recv(&limits).expect("VERSION");
        let header = got.header();
        assert_eq!(header.cmd, Command::Version.raw());
        let ours = String::from_utf8_lossy(&got.bytes[HEADER_SIZE + 4..]).into_owned();
        assert!(ours.contains(r#""vfio-mig":{"version":1}"#), "{ours}");
        answer(&mut conn, &header, &version_reply);
        for (n, step) in steps.iter().enumerate() {
            let got = match conn.recv(&limits) {
                Ok(g) => g,
                Err(e) => panic!("step {n} {}: client sent nothing ({e})", step.label),
            };
            let header = got.header();
            assert_eq!(
                (header.cmd, &got.bytes[HEADER_SIZE..]),
                (
                    u16::from_le_bytes([step.request[2], step.request[3]]),
                    &step.request[HEADER_SIZE..]
                ),
                "step {n} {}: the client's request differs from the recorded one",
                step.label
            );
            answer(&mut conn, &header, &step.reply);
        }
        match conn.recv(&limits) {
            Err(SocketError::Closed) => {}
            Ok(extra) => panic!("client sent an unscripted message: {:?}", extra.header()),
            Err(e) => panic!("{e}"),
        }
        steps.len()
    })
}

fn start(
    version_reply: Vec<u8>,
    steps: Vec<Step>,
    options: ClientOptions,
) -> (Arc<Client>, JoinHandle<usize>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let server = fake_server(theirs, version_reply, steps);
    let client = Client::from_stream(ours, options).expect("negotiation");
    (Arc::new(client), server)
}

fn remote_errno(e: &ClientError) -> Errno {
    match e {
        ClientError::Remote { errno, .. } => *errno,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[test]
fn gpio_probe_queries_and_migration_through_the_client() {
    let gpio = Recording::load("libvfio-user-gpio-probe.jsonl");
    let mut steps = gpio.ids(257..=282);
    steps.extend(gpio.ids(284..=287));
    // SET ERROR and SET RUNNING_P2P fail; after each failure the client GETs the state
    // (libvfio-user's probe did not): the recorded GET of msg 306 says RUNNING, as it was.
    steps.extend(gpio.ids([289, 306, 290, 306, 291, 292]));
    steps.extend(gpio.ids(293..=296));
    steps.extend(gpio.ids(298..=300));
    steps.extend(gpio.ids(301..=307));
    let expected_steps = steps.len();
    let (client, server) = start(gpio.version_reply(), steps, ClientOptions::default());

    let n = client.negotiated();
    assert_eq!(n.version, (0, 2));
    assert_eq!(n.server.max_msg_fds(), 8);
    assert_eq!(n.server.migration_pgsize(), Some(4096));
    assert_eq!(
        n.extension, None,
        "a standard server sends no vfio-mig object"
    );
    assert_eq!(n.max_read, 1 << 20);
    assert_eq!(n.max_payload, Some(32 * 1024));
    assert_eq!(n.write_chunk(8), 32 * 1024 - 8);
    assert!(!n.precopy_info());

    // Queries.
    let info = client.device_info().unwrap();
    assert_eq!((info.flags, info.num_regions, info.num_irqs), (3, 9, 5));
    for index in 0..9 {
        let region = client.region_info(index).unwrap();
        assert_eq!(region.info.index, index);
        assert!(region.fd.is_none() && region.sparse_mmap.is_none());
        let expected = if index == 2 || index == 7 { 0x100 } else { 0 };
        assert_eq!(region.info.size, expected, "region {index}");
    }
    let irq_counts: Vec<u32> = (0..5).map(|i| client.irq_info(i).unwrap().count).collect();
    assert_eq!(irq_counts, [1, 0, 0, 1, 1]);
    let mut config = [0u8; 64];
    client.region_read(7, 0, &mut config).unwrap();
    assert_eq!(config[..4], [0x4f, 0x49, 0xc8, 0x0d]);
    let mut full = [0u8; 256];
    client.region_read(7, 0, &mut full).unwrap();
    assert_eq!(full[..64], config);
    let mut pins = [0u8; 1];
    client.region_read(2, 1, &mut pins).unwrap();
    assert_eq!(pins, [0xff]);
    client.region_write(2, 0, &[0x0f]).unwrap();
    client.region_read(2, 1, &mut pins).unwrap();
    assert_eq!(pins, [0xf0]);

    // Migration basics through MigrationDevice.
    let device = RemoteDevice::new(Arc::clone(&client));
    assert_eq!(device.features().unwrap(), MigrationFeatures::PRE_COPY);
    assert!(client.feature_probe(2, 0).unwrap());
    // The GET reply carries data_fd 0; only the state matters.
    assert_eq!(device.state().unwrap(), DeviceState::Running);
    assert!(device.set_state(DeviceState::Stop).unwrap().is_none());
    assert_eq!(device.state().unwrap(), DeviceState::Stop);
    assert!(device.set_state(DeviceState::Running).unwrap().is_none());

    // Error replies, header-only.
    assert_eq!(
        remote_errno(&client.region_info(9).unwrap_err()),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(&client.irq_info(5).unwrap_err()),
        Errno::EINVAL
    );
    let mut eight = [0u8; 8];
    assert_eq!(
        remote_errno(&client.region_read(2, 0xfc, &mut eight).unwrap_err()),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(&client.region_read(2, 0x100, &mut eight[..4]).unwrap_err()),
        Errno::EINVAL
    );
    // Error replies with the request payload echoed: the device did not move.
    for target in [DeviceState::Error, DeviceState::RunningP2p] {
        let err = device.set_state(target).unwrap_err();
        assert_eq!(err.errno(), Errno::EINVAL, "{err}");
        assert_eq!(err.reached, Some(DeviceState::Running));
        assert_eq!(err.failed_arc, None, "refused, no arc taken");
    }
    let mut data = [0u8; 64];
    assert_eq!(
        remote_errno(&client.mig_data_read(&mut data).unwrap_err()),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(&client.mig_data_write(&data).unwrap_err()),
        Errno::EINVAL
    );

    // RUNNING -> STOP_COPY in one SET: the last arc (STOP -> STOP_COPY) opens a session.
    let mut stream = device
        .set_state(DeviceState::StopCopy)
        .unwrap()
        .expect("STOP_COPY opens a saving session");
    assert_eq!(stream.direction(), StreamDirection::Saving);
    assert_eq!(device.state().unwrap(), DeviceState::StopCopy);
    assert_eq!(stream.read(&mut data).unwrap(), ReadOutcome::Data(64));
    assert_eq!(data[..8], [1, 0, 0, 0, 1, 0, 0, 0]);
    // The 0-byte reply is padded to 64 bytes: end of the device state.
    let mut scratch = [0xaau8; 64];
    assert_eq!(stream.read(&mut scratch).unwrap(), ReadOutcome::End);
    // STOP_COPY -> PRE_COPY is refused; the session survives in STOP_COPY.
    let err = device.set_state(DeviceState::PreCopy).unwrap_err();
    assert_eq!(err.errno(), Errno::EINVAL);
    assert_eq!(err.reached, Some(DeviceState::StopCopy));
    // Without the extension there is no precopy info (answered locally).
    assert_eq!(stream.precopy_info().unwrap_err().errno(), Errno::ENOTTY);
    assert!(device.set_state(DeviceState::Stop).unwrap().is_none());
    // The session ended: the stream fails locally, nothing is sent.
    assert_eq!(
        stream.read(&mut scratch).unwrap_err().errno(),
        Errno::ENODEV
    );
    assert_eq!(
        remote_errno(&client.mig_data_read(&mut scratch).unwrap_err()),
        Errno::EINVAL
    );

    // STOP -> RESUMING opens a resuming session; the gpio sample's write callback returns 0,
    // which libvfio-user treats as a short write: EINVAL.
    let mut resume = device
        .set_state(DeviceState::Resuming)
        .unwrap()
        .expect("RESUMING opens a session");
    assert_eq!(resume.direction(), StreamDirection::Resuming);
    // Writes are posted: the refusal comes with the next state change, which then does not
    // happen; asked again, the device leaves RESUMING.
    assert_eq!(resume.write(&data).unwrap(), 64);
    let err = device.set_state(DeviceState::Stop).unwrap_err();
    assert_eq!(err.errno(), Errno::EINVAL);
    assert_eq!(err.reached, Some(DeviceState::Resuming));
    assert!(device.set_state(DeviceState::Stop).unwrap().is_none());
    assert_eq!(resume.write(&data).unwrap_err().errno(), Errno::ENODEV);
    assert!(device.set_state(DeviceState::Running).unwrap().is_none());
    assert_eq!(device.state().unwrap(), DeviceState::Running);
    client.region_read(2, 1, &mut pins).unwrap();
    assert_eq!(pins, [0xf0]);
    assert!(!client.is_broken());

    drop(stream);
    drop(resume);
    drop(device);
    drop(client);
    assert_eq!(server.join().unwrap(), expected_steps);
}

/// The sample source and destination sessions: dirty-page reports, a pre-copy and a
/// stop-copy save read in 1 KiB chunks, and the resume written back in the same chunks.
#[test]
fn sample_migration_save_and_resume_through_the_client() {
    let gpio = Recording::load("libvfio-user-gpio-probe.jsonl");
    let source = Recording::load("libvfio-user-sample-source.jsonl");
    let destination = Recording::load("libvfio-user-sample-destination.jsonl");
    let small = ClientOptions {
        max_data_xfer_size: 1024,
        ..ClientOptions::default()
    };

    // Source: logging start, 16 reports, stop; then the migration. The sample session has no
    // MIGRATION or state GET: the gpio probe's recorded answers (PRE_COPY capable, RUNNING)
    // stand in for them.
    let mut steps = source.indices([74]);
    steps.extend(source.indices((96..=126).step_by(2)));
    steps.extend(source.indices([128]));
    steps.extend(gpio.ids([277, 279]));
    steps.extend(source.indices((180..=212).step_by(2)));
    steps.extend(source.indices((214..=250).step_by(2)));
    let expected_steps = steps.len();
    let (client, server) = start(source.version_reply(), steps, small.clone());
    assert_eq!(client.negotiated().max_read, 1024);

    client.dma_logging_start(4096, &[]).unwrap();
    let device = RemoteDevice::new(Arc::clone(&client));
    let mut dirty = Vec::new();
    for k in 0..16u64 {
        let mut bitmap = [0u64; 1];
        device
            .dma_logging_report(k * 0x1000, 0x1000, 0x1000, &mut bitmap)
            .unwrap();
        dirty.push(bitmap[0]);
    }
    // The sample server's timer DMA-wrote into the second 4 KiB region only.
    let mut expected = [0u64; 16];
    expected[1] = 1;
    assert_eq!(dirty, expected);
    client.dma_logging_stop(4096).unwrap();

    let mut stream = device
        .set_state(DeviceState::PreCopy)
        .unwrap()
        .expect("RUNNING -> PRE_COPY opens a session");
    let mut precopy = Vec::new();
    let mut buf = vec![0u8; 4096];
    for _ in 0..16 {
        // Asks for 1 KiB (the negotiated size) however large the buffer.
        match stream.read(&mut buf).unwrap() {
            ReadOutcome::Data(n) => precopy.extend_from_slice(&buf[..n]),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(precopy.len(), 16 * 1024);
    assert!(
        device.set_state(DeviceState::StopCopy).unwrap().is_none(),
        "same session"
    );
    let mut saved = Vec::new();
    for _ in 0..17 {
        match stream.read(&mut buf).unwrap() {
            ReadOutcome::Data(n) => saved.extend_from_slice(&buf[..n]),
            other => panic!("{other:?}"),
        }
    }
    // BAR1 again, then the 8-byte BAR0 value from a reply padded to 1 KiB.
    assert_eq!(saved.len(), 16 * 1024 + 8);
    assert_eq!(saved[..16 * 1024], precopy[..]);
    assert!(device.set_state(DeviceState::Stop).unwrap().is_none());
    assert_eq!(stream.read(&mut buf).unwrap_err().errno(), Errno::ENODEV);
    drop((stream, device, client));
    assert_eq!(server.join().unwrap(), expected_steps);

    // Destination: the saved bytes written back in the recorded 1 KiB chunks, then BAR1
    // read back in 1 KiB REGION_READs.
    let mut steps = gpio.ids([277, 279]);
    steps.extend(destination.indices((2..=38).step_by(2)));
    steps.extend(destination.indices((40..=70).step_by(2)));
    let expected_steps = steps.len();
    let (client, server) = start(destination.version_reply(), steps, small);
    let device = RemoteDevice::new(Arc::clone(&client));
    let mut resume = device
        .set_state(DeviceState::Resuming)
        .unwrap()
        .expect("RESUMING opens a session");
    for chunk in saved.chunks(1024) {
        assert_eq!(resume.write(chunk).unwrap(), chunk.len());
    }
    assert!(device.set_state(DeviceState::Stop).unwrap().is_none());
    let mut bar1 = vec![0u8; 16 * 1024];
    client.region_read(1, 0, &mut bar1).unwrap();
    assert_eq!(bar1[..], saved[..16 * 1024]);
    drop((resume, device, client));
    assert_eq!(server.join().unwrap(), expected_steps);
}
