"""Pool-wide limits, defined once: the protocol, the coordinator, the agent, the worker and the guest channel
all import them from here, so a submission the coordinator accepts always fits every hop to the guest and back.

Each limit exists because something on the way is bounded: a ZeroMQ frame, the guest channel's frame, host
memory. The budgets nest: the files of one job travel in one message, so the sum of their sizes stays well
below the frame limit, leaving room for the message's other fields.
"""

from __future__ import annotations

# --- Guest memory ------------------------------------------------------------------------------------------
MIN_GUEST_MEM_MIB = 48  # the kernel decompresses itself to 16 MiB; below this it cannot boot
MAX_GUEST_MEM_MIB = 768  # lowmem only (NOHIGHMEM): more would be invisible to the guest
DEFAULT_GUEST_MEM_MIB = 128

# --- Control-plane messages ----------------------------------------------------------------------------------
MAX_FRAME_BYTES = 64 << 20  # one control-plane message
MAX_SMALL_FIELD = 4096  # names, states, one argument, one path
MAX_TEXT_FIELD = 1 << 20  # error texts, reasons

# --- A job's command ---------------------------------------------------------------------------------------
MAX_ARGV = 256  # arguments, program name included
MAX_ARGV_BYTES = 256 << 10  # all arguments and the working directory, UTF-8, one NUL after each

# --- A job's files -----------------------------------------------------------------------------------------
MAX_FILES = 64  # inputs, and outputs asked for
MAX_PATH_BYTES = 1024  # one input or output name, relative to the job directory
MAX_JOB_INPUT_BYTES = 48 << 20  # all inputs of one job together
MAX_OUTPUT_FILE_BYTES = 32 << 20  # one output file; a larger one is reported missing with the reason
MAX_JOB_OUTPUT_BYTES = 48 << 20  # all output files of one job together
MAX_JOB_PRIORITY = 1000  # a job's priority among its owner's jobs is -MAX..MAX (default 0)

# --- A job's launch: environment, time limit, arrays ---------------------------------------------------------
MAX_ENV_VARS = 128  # environment variables a job sets (names and values each at most MAX_SMALL_FIELD)
MAX_JOB_TIMEOUT_S = 30 * 86400  # the longest time limit a job may ask for
MAX_ARRAY_TASKS = 10_000  # tasks of one array submission
MAX_ARRAY_ITEMS_BYTES = 1 << 20  # an array's items together (UTF-8, one NUL each)

# --- A job's stdout and stderr ---------------------------------------------------------------------------
MAX_STREAM_BYTES = 16 << 20  # stdout and stderr of one job together; beyond it output is dropped, said once
OUTPUT_CHUNK_BYTES = 32 << 10  # one job_output message carries at most this much

# --- Jobs of several guests (gangs) and conet ------------------------------------------------------------------
MAX_JOB_GUESTS = 64  # guests of one job, placed all at once
MAX_HOSTNAME = 63  # one DNS label

# --- Guest disks (cobd) ------------------------------------------------------------------------------------
# What one guest may write to its copy-on-write overlay: the host disk never holds more for it.
DEFAULT_DISK_BUDGET_MIB = 1024
MAX_DISK_BUDGET_MIB = 4096

# --- Disk images in the pool ----------------------------------------------------------------------------------
# An image is stored and shipped in chunks, each named by its SHA-256: one chunk is one control-plane message,
# and the chunk list of the largest image fits in a run_job message beside a job's inputs.
IMAGE_CHUNK_BYTES = 1 << 20
MAX_IMAGE_BYTES = 16 << 30
MAX_IMAGE_CHUNKS = MAX_IMAGE_BYTES // IMAGE_CHUNK_BYTES
MAX_IMAGE_NAME = 64  # letters, digits, '.', '_', '-'
# Chunks one agent asks the coordinator for at once: enough to keep a LAN busy, few enough that the
# coordinator's loop never spends long on one agent's fetch.
IMAGE_FETCH_WINDOW = 8
IMAGE_FETCH_TRIES = 3  # a chunk that arrives corrupt this many times in a row fails the fetch
DEFAULT_IMAGE_CACHE_MIB = 16384  # what an agent keeps of the pool's images on its disk
MAX_IMAGE_CACHE_MIB = 1 << 24

# --- Snapshots ----------------------------------------------------------------------------------------------
# A whole guest on disk or on the wire: its RAM and its disk overlay (incompressible at worst) plus the jobs'
# state beside it.
MAX_SNAPSHOT_BYTES = ((MAX_GUEST_MEM_MIB + MAX_DISK_BUDGET_MIB) << 20) + 8 * MAX_FRAME_BYTES

# Checkpoints of running jobs (coordinator.toml: checkpoint_interval_s, checkpoint_budget_mib)
DEFAULT_CHECKPOINT_INTERVAL_S = 600.0  # a dead workstation costs at most this much of a job's work
MAX_CHECKPOINT_INTERVAL_S = 7 * 86400.0
DEFAULT_CHECKPOINT_BUDGET_MIB = 10240  # the coordinator's disk for all checkpoints together
MAX_CHECKPOINT_BUDGET_MIB = 1 << 24

# --- The guest channel ---------------------------------------------------------------------------------------
CHANNEL_MAX_PAYLOAD = 1 << 20  # one frame between the host and the in-guest agent

# --- conet, the guests' network ------------------------------------------------------------------------------
# A conet frame is a 12-byte virtio_net_hdr_v1 and one Ethernet frame. Plain frames carry IP packets of at most
# the MTU; GSO frames (segmentation offload) carry up to 64 KiB, cut into MTU-sized packets by the receiving NIC.
CONET_VNET_HDR = 12
# Between conode guests a frame never touches a wire, so the MTU is as large as an IPv4 packet allows (less the
# 14 bytes that keep a plain frame one byte short of the largest): what an emulated guest pays most for is
# frames (an interrupt, an skb, a TCP ACK each), and a 64 KiB MTU halves them against 9000 even where TCP sends
# segmentation-offload frames, which the kernel sizes by the pacing rate (two segments at these rates).
CONET_MTU = 65520
CONET_MAX_FRAME = CONET_VNET_HDR + 65535 + 14
# What one guest may send into its switch, and one peer agent into ours: token buckets in bytes and frames,
# each holding CONET_BURST_S seconds of its rate. A flooding guest costs its agent at most this much.
CONET_PORT_BYTES_PER_S = 128 << 20
CONET_PORT_FRAMES_PER_S = 8192
CONET_PEER_BYTES_PER_S = 512 << 20
CONET_PEER_FRAMES_PER_S = 65536
CONET_BURST_S = 0.05
# Storm control: the copies of a guest's broadcast, multicast and unknown-unicast frames (one per port and peer
# it goes to), so that what a flooding guest costs does not grow with the size of the pool.
CONET_PORT_FLOOD_COPIES_PER_S = 4096
CONET_PORT_FLOOD_BYTES_PER_S = 32 << 20
# Frames waiting for one guest's port (beyond its socket's buffer), and for one peer agent's link.
CONET_PORT_QUEUE_FRAMES = 256
CONET_PORT_QUEUE_BYTES = 2 << 20
CONET_PEER_QUEUE_BYTES = 8 << 20
# One switch: its guests, its peers, and the MACs it learns behind peers per network (forgotten when idle).
CONET_MAX_PORTS = 256
CONET_MAX_PEERS = 1024
CONET_MAC_TABLE = 4096
CONET_MAC_AGE_S = 300.0
# The coordinator's relay, for two agents that cannot reach each other: a peer link down this long sends its
# frames by the relay; what one agent may send through it; the messages (each a batch of frames) that may wait
# for one agent there.
CONET_RELAY_AFTER_S = 3.0
CONET_RELAY_BYTES_PER_S = 32 << 20
CONET_RELAY_FRAMES_PER_S = 8192
CONET_RELAY_QUEUE_MESSAGES = 64

# --- The owner's pause (`conode pause`) ------------------------------------------------------------------------
DEFAULT_PAUSE_S = 3600.0  # BOINC's snooze: an hour unless the owner says how long
MAX_PAUSE_S = 7 * 86400.0  # a pause always ends by itself; longer is the admin's business (drain)

assert MAX_ARGV * MAX_SMALL_FIELD >= MAX_ARGV_BYTES  # the byte budget is the binding one
assert MAX_ARGV_BYTES + MAX_SMALL_FIELD < CHANNEL_MAX_PAYLOAD  # an accepted command always fits an EXEC frame
assert MAX_JOB_OUTPUT_BYTES + MAX_FILES * (MAX_PATH_BYTES + 16) + (1 << 20) < MAX_FRAME_BYTES
assert MAX_JOB_INPUT_BYTES + MAX_FILES * (MAX_PATH_BYTES + 16) + MAX_ARGV_BYTES + (1 << 20) < MAX_FRAME_BYTES
assert MAX_OUTPUT_FILE_BYTES <= MAX_JOB_OUTPUT_BYTES
# A submission carries its inputs, its command, its environment and an array's items in one message.
assert (MAX_JOB_INPUT_BYTES + MAX_FILES * (MAX_PATH_BYTES + 16) + MAX_ARGV_BYTES + 2 * MAX_ENV_VARS * MAX_SMALL_FIELD
        + MAX_ARRAY_ITEMS_BYTES + (1 << 20) < MAX_FRAME_BYTES)
# A run_job message with an image carries its chunk list (32 bytes a chunk) beside the job's inputs.
assert (MAX_JOB_INPUT_BYTES + MAX_FILES * (MAX_PATH_BYTES + 16) + MAX_ARGV_BYTES + 40 * MAX_IMAGE_CHUNKS
        + (1 << 20) < MAX_FRAME_BYTES)
assert IMAGE_CHUNK_BYTES * IMAGE_FETCH_WINDOW < MAX_FRAME_BYTES
