// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * coagent - the conode in-guest agent.
 *
 * It runs as PID 1 inside the guest (exec'd by /init) and serves the host over
 * the virtio console /dev/hvc0 — or, with a kernel that has no virtio console
 * (a distribution kernel builds it as a module), over the second serial port
 * /dev/ttyS1 — with a small binary protocol.  Every frame, in
 * both directions, is a 9-byte little-endian header
 *
 *     type:u8  id:u32  length:u32
 *
 * followed by `length` payload bytes (at most 1 MiB).
 *
 * Host -> guest:
 *   'X' exec   payload: cwd NUL argv0 NUL argv1 NUL ...
 *   'K' kill   payload: u32 signal, sent to the job's process group; with
 *              id 0, to every process but the agent (PID 1 mode only)
 *   'P' put    payload: path NUL u32 mode; followed by 'D' data frames,
 *              an empty 'D' closes the file and is answered by 'A'
 *   'D' data   (see 'P')
 *   'G' get    payload: root NUL relative-path NUL u32 max-bytes; answered
 *              by 'F' chunks and an empty 'F'.  Only a regular file whose
 *              real path lies inside root, of at most max-bytes, is sent:
 *              anything else (a link out of root, a FIFO, a device, a file
 *              too large) is answered by 'Z' with the reason
 *   'N' renew  payload: i64 seconds, u32 nanoseconds (the host's wall
 *              clock), then entropy bytes: sets the clock, credits the
 *              entropy and reseeds the kernel's RNG; answered by 'A'
 *   'I' identity  the guest's conet identity, NUL-terminated key=value
 *              strings: mac=xx:xx:xx:xx:xx:xx, addr=a.b.c.d/prefix,
 *              hostname=NAME, host=a.b.c.d NAME (one per guest of the job),
 *              env=CONODE_NAME=value (for the commands run after it).
 *              Everything is checked before anything changes; then eth0
 *              gets the MAC and address (the route to its network is its
 *              only route) and goes up, the hostname and /etc/hosts are
 *              written and the environment is set; answered by 'A'
 *   'Q' quit   sync and power off
 * Guest -> host:
 *   'R' ready  payload: "sysname release machine" (sent once at start)
 *   'O' / 'E'  stdout / stderr data of an exec job
 *   'S' status payload: i32 exit code, or 128 + signal number
 *   'A' ack    a put or a renew finished successfully
 *   'F' file   data of a get
 *   'Z' error  payload: one-line message
 *
 * The agent is single-threaded: one poll() loop over the console, a SIGCHLD
 * self-pipe and the output pipes of all running jobs.  Every frame is written
 * completely before the next one starts, so frames never interleave and the
 * output of one job keeps its order.
 *
 * Build: gcc -m32 -static -Os -s -o coagent coagent.c
 * Options (for testing on a normal host):
 *   --device PATH  talk over PATH instead of /dev/hvc0 (e.g. a pty slave)
 *   --no-pid1      do not power off on 'Q' or when the console is missing;
 *                  exit instead
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <linux/random.h>
#include <linux/serial.h>
#include <sys/ioctl.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define HDR_LEN      9
#define MAX_PAYLOAD  (1u << 20)     /* larger frames are refused and skipped */
#define CHUNK        (32u * 1024)   /* largest O/E/F payload we send */
#define READ_SIZE    (64u * 1024)   /* how much we read from the console at once */

#define NET_IFACE     "eth0"          /* the conet NIC */
#define MAX_HOSTS     256             /* guests of one job in /etc/hosts */
#define MAX_HOSTNAME  63
#define MAX_ENV       8               /* CONODE_* variables set by 'I' */
#define MAX_ENV_NAME  64
#define MAX_ENV_VALUE (MAX_HOSTS * (MAX_HOSTNAME + 1))

#define SHELL_TTY    "/dev/ttyS0"
#define SHELL_PATH   "/bin/sh"

/* One running EXEC. */
struct job {
	uint32_t id;
	pid_t pid;          /* also the process group id: the child calls setsid() */
	int out_fd;         /* read end of the stdout pipe, -1 after EOF */
	int err_fd;         /* read end of the stderr pipe, -1 after EOF */
	int exited;         /* the child has been reaped */
	int32_t status;     /* exit code or 128 + signal, valid when exited */
};

/* One file being received by PUT. */
struct put {
	uint32_t id;
	int fd;
	char *path;
};

#define VIRTIO_CONSOLE_DRIVER "/sys/bus/virtio/drivers/virtio_console"
#define SERIAL_CHANNEL "/dev/ttyS1"

static const char *device_path = "/dev/hvc0";
static int default_device = 1;  /* no --device: hvc0, else the serial channel */
static int pid1_mode = 1;

static int hvc_fd = -1;
static int sigchld_pipe[2] = { -1, -1 };

static struct job *jobs;
static size_t njobs, cap_jobs;
static struct put *puts_;
static size_t nputs, cap_puts;

/* Console input: frames may arrive split over several reads. */
static unsigned char *rbuf;
static size_t rbuf_len, rbuf_cap;
static uint64_t skip_bytes;     /* payload of a refused frame still to drop */

/* The optional interactive shell on the serial port. */
static int want_shell;
static pid_t shell_pid = -1;
static time_t shell_respawn_at;  /* 0: no respawn pending */
static time_t shell_started;

/* ------------------------------------------------------------------ */
/* Small helpers                                                       */
/* ------------------------------------------------------------------ */

/* Log to our stderr: the kernel console when we are PID 1. */
static void logmsg(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n;

	n = snprintf(buf, sizeof(buf), "coagent: ");
	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof(buf) - n, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(buf) - 2)
		n = sizeof(buf) - 2;
	buf[n++] = '\n';
	/* Best effort: there is nobody to tell if logging itself fails. */
	if (write(STDERR_FILENO, buf, n) < 0) {
		/* ignored */
	}
}

static void *xrealloc(void *p, size_t n)
{
	p = realloc(p, n);
	if (!p) {
		logmsg("out of memory");
		_exit(1);
	}
	return p;
}

static void put_le32(unsigned char *p, uint32_t v)
{
	p[0] = v; p[1] = v >> 8; p[2] = v >> 16; p[3] = v >> 24;
}

static uint32_t get_le32(const unsigned char *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 |
	       (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/*
 * Write all of buf.  Copes with short writes, EINTR and (should the
 * descriptor ever be non-blocking) EAGAIN, so that a frame is never cut.
 */
static int write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len > 0) {
		ssize_t n = write(fd, p, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN) {
				struct pollfd pfd = { .fd = fd, .events = POLLOUT };

				poll(&pfd, 1, -1);
				continue;
			}
			return -1;
		}
		p += n;
		len -= n;
	}
	return 0;
}

/* Create dir and all its parents (like mkdir -p); existing ones are fine. */
static int mkdir_p(const char *dir)
{
	char *copy = strdup(dir);
	char *p;
	int ret = 0;

	if (!copy)
		return -1;
	for (p = copy + 1; ; p++) {
		if (*p == '/' || *p == '\0') {
			char c = *p;

			*p = '\0';
			if (mkdir(copy, 0755) < 0 && errno != EEXIST) {
				ret = -1;
				break;
			}
			*p = c;
			if (c == '\0')
				break;
		}
	}
	free(copy);
	return ret;
}

/* mkdir -p of the directory that contains path. */
static int mkdir_parent(const char *path)
{
	char *copy = strdup(path);
	char *slash;
	int ret = 0;

	if (!copy)
		return -1;
	slash = strrchr(copy, '/');
	if (slash && slash != copy) {
		*slash = '\0';
		ret = mkdir_p(copy);
	}
	free(copy);
	return ret;
}

/* ------------------------------------------------------------------ */
/* Frames to the host                                                  */
/* ------------------------------------------------------------------ */

static void send_frame(uint8_t type, uint32_t id, const void *data, uint32_t len)
{
	/* Header and payload go out in one write() when they fit: fewer trips
	 * through the virtio console, and a frame is written before any other. */
	static unsigned char buf[HDR_LEN + CHUNK];

	if (hvc_fd < 0)
		return;
	buf[0] = type;
	put_le32(buf + 1, id);
	put_le32(buf + 5, len);
	if (len <= CHUNK) {
		if (len)
			memcpy(buf + HDR_LEN, data, len);
		if (write_all(hvc_fd, buf, HDR_LEN + len) < 0)
			logmsg("write to %s: %s", device_path, strerror(errno));
	} else if (write_all(hvc_fd, buf, HDR_LEN) < 0 ||
		   write_all(hvc_fd, data, len) < 0) {
		logmsg("write to %s: %s", device_path, strerror(errno));
	}
}

/* Send a 'Z' error frame with a printf-style one-line message. */
static void send_error(uint32_t id, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if (n >= (int)sizeof(msg))
		n = sizeof(msg) - 1;
	send_frame('Z', id, msg, n);
}

/* ------------------------------------------------------------------ */
/* Jobs (EXEC)                                                         */
/* ------------------------------------------------------------------ */

static struct job *find_job(uint32_t id)
{
	for (size_t i = 0; i < njobs; i++)
		if (jobs[i].id == id)
			return &jobs[i];
	return NULL;
}

/* Undo what the agent changed in its own process before a child execs:
 * ignored signals and the signal mask survive exec. */
static void reset_signals_for_child(void)
{
	sigset_t none;

	signal(SIGCHLD, SIG_DFL);
	signal(SIGPIPE, SIG_DFL);
	signal(SIGINT, SIG_DFL);
	signal(SIGTERM, SIG_DFL);
	signal(SIGHUP, SIG_DFL);
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
}

/* The forked child of an EXEC; never returns. */
static void exec_child(const char *cwd, char **argv, int out_w, int err_w)
{
	int null_fd;

	reset_signals_for_child();
	/* Own session and process group, so that KILL reaches the whole job
	 * and the job has no controlling terminal. */
	setsid();

	null_fd = open("/dev/null", O_RDONLY);
	if (null_fd < 0 || dup2(null_fd, STDIN_FILENO) < 0 ||
	    dup2(out_w, STDOUT_FILENO) < 0 || dup2(err_w, STDERR_FILENO) < 0)
		_exit(126);
	/* The pipe ends were opened close-on-exec; the dup2 copies are not. */

	if (mkdir_p(cwd) < 0 || chdir(cwd) < 0) {
		dprintf(STDERR_FILENO, "%s: %s\n", cwd, strerror(errno));
		_exit(126);
	}

	execvp(argv[0], argv);
	if (errno == ENOENT) {
		dprintf(STDERR_FILENO, "%s: not found\n", argv[0]);
		_exit(127);
	}
	dprintf(STDERR_FILENO, "%s: %s\n", argv[0], strerror(errno));
	_exit(126);
}

static void handle_exec(uint32_t id, const unsigned char *data, uint32_t len)
{
	const char *cwd;
	char **argv;
	size_t argc = 0, i, pos;
	int out_pipe[2], err_pipe[2];
	pid_t pid;
	struct job *job;

	if (find_job(id)) {
		send_error(id, "exec: job id %u is already running", id);
		return;
	}
	/* Every string must be NUL-terminated, and argv0 must exist. */
	if (len == 0 || data[len - 1] != '\0') {
		send_error(id, "exec: malformed payload");
		return;
	}
	for (i = 0; i < len; i++)
		if (data[i] == '\0')
			argc++;
	argc--;     /* the first string is the working directory */
	if (argc < 1) {
		send_error(id, "exec: no command given");
		return;
	}

	cwd = (const char *)data;
	if (*cwd == '\0')
		cwd = "/";
	argv = xrealloc(NULL, (argc + 1) * sizeof(*argv));
	pos = strlen((const char *)data) + 1;
	for (i = 0; i < argc; i++) {
		argv[i] = (char *)data + pos;
		pos += strlen(argv[i]) + 1;
	}
	argv[argc] = NULL;
	if (argv[0][0] == '\0') {
		send_error(id, "exec: empty command name");
		free(argv);
		return;
	}

	if (pipe2(out_pipe, O_CLOEXEC) < 0) {
		send_error(id, "exec: pipe: %s", strerror(errno));
		free(argv);
		return;
	}
	if (pipe2(err_pipe, O_CLOEXEC) < 0) {
		send_error(id, "exec: pipe: %s", strerror(errno));
		close(out_pipe[0]);
		close(out_pipe[1]);
		free(argv);
		return;
	}

	pid = fork();
	if (pid < 0) {
		send_error(id, "exec: fork: %s", strerror(errno));
		close(out_pipe[0]);
		close(out_pipe[1]);
		close(err_pipe[0]);
		close(err_pipe[1]);
		free(argv);
		return;
	}
	if (pid == 0)
		exec_child(cwd, argv, out_pipe[1], err_pipe[1]);

	/* Parent: keep only the read ends, so EOF arrives when the job (and
	 * everything it started that kept the pipes) is gone. */
	close(out_pipe[1]);
	close(err_pipe[1]);
	free(argv);

	if (njobs == cap_jobs) {
		cap_jobs = cap_jobs ? 2 * cap_jobs : 8;
		jobs = xrealloc(jobs, cap_jobs * sizeof(*jobs));
	}
	job = &jobs[njobs++];
	job->id = id;
	job->pid = pid;
	job->out_fd = out_pipe[0];
	job->err_fd = err_pipe[0];
	job->exited = 0;
	job->status = 0;
}

/* Send 'S' and forget the job once its output is drained and it is reaped.
 * Checking both conditions keeps all 'O'/'E' frames before the 'S'. */
static void finish_job_if_done(size_t idx)
{
	struct job *job = &jobs[idx];
	unsigned char st[4];

	if (!job->exited || job->out_fd >= 0 || job->err_fd >= 0)
		return;
	put_le32(st, (uint32_t)job->status);
	send_frame('S', job->id, st, sizeof(st));
	jobs[idx] = jobs[--njobs];
}

/* Forward what is available on one output pipe of a job. */
static void pump_pipe(struct job *job, int *fdp, uint8_t type)
{
	static char buf[CHUNK];
	ssize_t n;

	do
		n = read(*fdp, buf, sizeof(buf));
	while (n < 0 && errno == EINTR);
	if (n > 0) {
		send_frame(type, job->id, buf, n);
		return;
	}
	/* EOF, or an error we cannot do anything about: treat both as EOF. */
	close(*fdp);
	*fdp = -1;
}

static void handle_kill(uint32_t id, const unsigned char *data, uint32_t len)
{
	struct job *job = find_job(id);

	if (len < 4) {
		send_error(id, "kill: malformed payload");
		return;
	}
	/* Id 0 names no job: signal everything but ourselves (what finished
	 * jobs left behind).  Only as PID 1 in the guest: on a test host this
	 * would reach every process of the user. */
	if (id == 0 && !job) {
		if (pid1_mode && kill(-1, (int)get_le32(data)) < 0 && errno != ESRCH)
			send_error(id, "kill: %s", strerror(errno));
		return;
	}
	/* An unknown id is normal: the job may have finished in the meantime. */
	if (!job)
		return;
	/* The job's leader called setsid(), so its pid is also its process
	 * group id; the group keeps existing while any member lives. */
	if (kill(-job->pid, (int)get_le32(data)) < 0 && errno != ESRCH)
		send_error(id, "kill: %s", strerror(errno));
}

/* ------------------------------------------------------------------ */
/* The serial shell                                                    */
/* ------------------------------------------------------------------ */

static void spawn_shell(void)
{
	pid_t pid = fork();

	if (pid < 0) {
		logmsg("fork for shell: %s", strerror(errno));
		shell_respawn_at = time(NULL) + 1;
		return;
	}
	if (pid == 0) {
		int fd;
		char *argv[] = { "sh", NULL };
		char *envp[] = {
			"TERM=vt100", "HOME=/root",
			"PATH=/bin:/sbin:/usr/bin:/usr/sbin", NULL
		};

		reset_signals_for_child();
		/* A new session without a terminal, then make the serial
		 * port its controlling terminal so that ^C and job control
		 * work in the shell. */
		setsid();
		fd = open(SHELL_TTY, O_RDWR);
		if (fd < 0) {
			logmsg("open %s: %s", SHELL_TTY, strerror(errno));
			_exit(1);
		}
		if (ioctl(fd, TIOCSCTTY, 0) < 0)
			logmsg("TIOCSCTTY on %s: %s", SHELL_TTY, strerror(errno));
		dup2(fd, STDIN_FILENO);
		dup2(fd, STDOUT_FILENO);
		dup2(fd, STDERR_FILENO);
		if (fd > STDERR_FILENO)
			close(fd);
		chdir("/root");
		execve(SHELL_PATH, argv, envp);
		logmsg("exec %s: %s", SHELL_PATH, strerror(errno));
		_exit(127);
	}
	shell_pid = pid;
	shell_started = time(NULL);
	shell_respawn_at = 0;
}

/* Does the kernel command line ask for the serial shell? */
static int cmdline_wants_shell(void)
{
	char buf[4096];
	char *tok, *save;
	ssize_t n;
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return 0;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	for (tok = strtok_r(buf, " \t\n", &save); tok;
	     tok = strtok_r(NULL, " \t\n", &save))
		if (strcmp(tok, "conode.shell=1") == 0)
			return 1;
	return 0;
}

/* ------------------------------------------------------------------ */
/* Children                                                            */
/* ------------------------------------------------------------------ */

static void sigchld_handler(int sig)
{
	int saved = errno;
	char c = 0;

	(void)sig;
	/* Only wake up the main loop; the pipe is non-blocking, and a full
	 * pipe already means a wake-up is pending. */
	if (write(sigchld_pipe[1], &c, 1) < 0) {
		/* ignored */
	}
	errno = saved;
}

/* Reap every child that has exited: our jobs, the shell, and (as PID 1)
 * orphans re-parented to us by the kernel. */
static void reap_children(void)
{
	for (;;) {
		int st;
		pid_t pid = waitpid(-1, &st, WNOHANG);

		if (pid < 0 && errno == EINTR)
			continue;
		if (pid <= 0)
			break;

		if (pid == shell_pid) {
			shell_pid = -1;
			/* Respawn at once, but not in a tight loop if the
			 * shell cannot start at all. */
			shell_respawn_at = time(NULL) - shell_started < 2 ?
					   time(NULL) + 2 : time(NULL);
			continue;
		}
		for (size_t i = 0; i < njobs; i++) {
			if (jobs[i].pid != pid || jobs[i].exited)
				continue;
			jobs[i].exited = 1;
			if (WIFEXITED(st))
				jobs[i].status = WEXITSTATUS(st);
			else if (WIFSIGNALED(st))
				jobs[i].status = 128 + WTERMSIG(st);
			else
				jobs[i].status = 255;
			finish_job_if_done(i);
			break;
		}
	}
}

/* ------------------------------------------------------------------ */
/* PUT / GET                                                           */
/* ------------------------------------------------------------------ */

static struct put *find_put(uint32_t id)
{
	for (size_t i = 0; i < nputs; i++)
		if (puts_[i].id == id)
			return &puts_[i];
	return NULL;
}

static void drop_put(struct put *p)
{
	free(p->path);
	*p = puts_[--nputs];
}

static void handle_put(uint32_t id, const unsigned char *data, uint32_t len)
{
	const char *path = (const char *)data;
	size_t plen = strnlen(path, len);
	mode_t mode;
	int fd;

	if (find_put(id)) {
		send_error(id, "put: id %u is already in use", id);
		return;
	}
	if (plen == 0 || plen + 1 + 4 > len) {
		send_error(id, "put: malformed payload");
		return;
	}
	mode = get_le32(data + plen + 1) & 07777;

	if (mkdir_parent(path) < 0) {
		send_error(id, "put: %s: cannot create parent directory: %s",
			   path, strerror(errno));
		return;
	}
	fd = open(path, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, mode);
	if (fd < 0) {
		send_error(id, "put: %s: %s", path, strerror(errno));
		return;
	}
	/* open() applies the umask and leaves an existing file's mode alone;
	 * the host asked for exactly this mode. */
	if (fchmod(fd, mode) < 0) {
		send_error(id, "put: %s: chmod: %s", path, strerror(errno));
		close(fd);
		return;
	}

	if (nputs == cap_puts) {
		cap_puts = cap_puts ? 2 * cap_puts : 4;
		puts_ = xrealloc(puts_, cap_puts * sizeof(*puts_));
	}
	puts_[nputs].id = id;
	puts_[nputs].fd = fd;
	puts_[nputs].path = strdup(path);
	nputs++;
}

static void handle_data(uint32_t id, const unsigned char *data, uint32_t len)
{
	struct put *p = find_put(id);

	/* No open file: the PUT failed (and was answered with 'Z'), so the
	 * rest of its data is dropped silently. */
	if (!p)
		return;

	if (len == 0) {
		int fd = p->fd;
		char *path = p->path;

		p->path = NULL;
		drop_put(p);
		if (close(fd) < 0)
			send_error(id, "put: %s: %s", path, strerror(errno));
		else
			send_frame('A', id, NULL, 0);
		free(path);
		return;
	}
	if (write_all(p->fd, data, len) < 0) {
		send_error(id, "put: %s: %s", p->path, strerror(errno));
		close(p->fd);
		drop_put(p);
	}
}

/* Is the real path of `path` inside the directory `root` (itself resolved)? */
static int path_is_inside(const char *path, const char *root)
{
	char real_root[PATH_MAX], real_path[PATH_MAX];
	size_t n;

	if (!realpath(root, real_root) || !realpath(path, real_path))
		return 0;
	n = strlen(real_root);
	return strncmp(real_path, real_root, n) == 0 &&
	       (real_path[n] == '/' || (n == 1 && real_root[0] == '/'));
}

static void handle_get(uint32_t id, const unsigned char *data, uint32_t len)
{
	static char buf[CHUNK];
	const char *root = (const char *)data, *rel;
	size_t root_len, rel_len;
	uint64_t max_bytes, sent = 0;
	char *path = NULL;
	struct stat st;
	int fd;

	root_len = strnlen(root, len);
	if (root_len == 0 || root_len >= len) {
		send_error(id, "get: malformed payload");
		return;
	}
	rel = root + root_len + 1;
	rel_len = strnlen(rel, len - root_len - 1);
	if (rel_len == 0 || root_len + 1 + rel_len + 1 + 4 != len) {
		send_error(id, "get: malformed payload");
		return;
	}
	max_bytes = get_le32(data + len - 4);
	path = xrealloc(NULL, root_len + rel_len + 2);
	sprintf(path, "%s/%s", root, rel);

	/* O_NOFOLLOW: a symlink as the file itself is refused outright;
	 * O_NONBLOCK: opening a FIFO must not wait for a writer. */
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
	if (fd < 0) {
		send_error(id, "get: %s: %s", rel, errno == ELOOP ?
			   "is a symbolic link" : strerror(errno));
		goto out;
	}
	if (fstat(fd, &st) < 0) {
		send_error(id, "get: %s: %s", rel, strerror(errno));
		goto out_close;
	}
	if (!S_ISREG(st.st_mode)) {
		send_error(id, "get: %s: not a regular file", rel);
		goto out_close;
	}
	if (!path_is_inside(path, root)) {
		send_error(id, "get: %s: lies outside the job directory", rel);
		goto out_close;
	}
	if ((uint64_t)st.st_size > max_bytes) {
		send_error(id, "get: %s: %llu bytes, more than the limit of %llu",
			   rel, (unsigned long long)st.st_size,
			   (unsigned long long)max_bytes);
		goto out_close;
	}
	/* Sent in one go: the event loop waits, but the file is consistent
	 * and the host gets its chunks back to back.  A file that grows while
	 * it is read is cut at the limit and refused. */
	for (;;) {
		ssize_t n = read(fd, buf, sizeof(buf));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			send_error(id, "get: %s: %s", rel, strerror(errno));
			goto out_close;
		}
		if (n == 0)
			break;
		if (sent + (uint64_t)n > max_bytes) {
			send_error(id, "get: %s: grew beyond the limit of %llu bytes",
				   rel, (unsigned long long)max_bytes);
			goto out_close;
		}
		sent += n;
		send_frame('F', id, buf, n);
	}
	send_frame('F', id, NULL, 0);
out_close:
	close(fd);
out:
	free(path);
}

/*
 * A guest restored from a snapshot shares its RNG state and its clock with
 * every other copy of that snapshot.  Before any job runs, the host sends
 * fresh entropy and its wall clock: credit the entropy and force a reseed,
 * so that the very next read of /dev/urandom differs from every other copy.
 */
static void handle_renew(uint32_t id, const unsigned char *data, uint32_t len)
{
	struct {
		struct rand_pool_info info;
		uint32_t words[64];
	} seed;
	struct timespec now;
	uint32_t nbytes;
	int fd;

	if (len < 12 + 16 || len > 12 + sizeof(seed.words)) {
		send_error(id, "renew: malformed payload");
		return;
	}
	now.tv_sec = (time_t)((uint64_t)get_le32(data) | (uint64_t)get_le32(data + 4) << 32);
	now.tv_nsec = get_le32(data + 8) % 1000000000u;
	nbytes = len - 12;
	memset(&seed, 0, sizeof(seed));
	memcpy(seed.words, data + 12, nbytes);
	seed.info.entropy_count = nbytes * 8;
	seed.info.buf_size = nbytes;

	if (clock_settime(CLOCK_REALTIME, &now) < 0) {
		send_error(id, "renew: clock_settime: %s", strerror(errno));
		return;
	}
	fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		send_error(id, "renew: /dev/urandom: %s", strerror(errno));
		return;
	}
	if (ioctl(fd, RNDADDENTROPY, &seed) < 0 || ioctl(fd, RNDRESEEDCRNG) < 0) {
		send_error(id, "renew: reseeding the RNG: %s", strerror(errno));
		close(fd);
		return;
	}
	close(fd);
	send_frame('A', id, NULL, 0);
}

/* ------------------------------------------------------------------ */
/* IDENTITY: the guest's name and address on conet                     */
/* ------------------------------------------------------------------ */

struct identity {
	unsigned char mac[6];
	struct in_addr addr;
	int prefix;
	const char *hostname;
	size_t nhosts;
	struct in_addr host_addr[MAX_HOSTS];
	const char *host_name[MAX_HOSTS];
	size_t nenv;
	const char *env[MAX_ENV];       /* "CONODE_NAME=value" */
};

/* RFC 1123 names: labels of letters, digits and inner hyphens, dot-separated. */
static int valid_hostname(const char *s)
{
	size_t len = strlen(s), label = 0;

	if (len == 0 || len > MAX_HOSTNAME)
		return 0;
	for (size_t i = 0; i <= len; i++) {
		char c = s[i];

		if (c == '.' || c == '\0') {
			if (label == 0 || s[i - 1] == '-')
				return 0;
			label = 0;
		} else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
			   (c >= '0' && c <= '9') || (c == '-' && label > 0)) {
			label++;
		} else {
			return 0;
		}
	}
	return 1;
}

static int parse_mac(const char *s, unsigned char mac[6])
{
	int any = 0;

	if (strlen(s) != 17)
		return 0;
	for (int i = 0; i < 6; i++) {
		unsigned v = 0;

		for (int j = 0; j < 2; j++) {
			char c = s[3 * i + j];

			v <<= 4;
			if (c >= '0' && c <= '9')
				v |= c - '0';
			else if (c >= 'a' && c <= 'f')
				v |= c - 'a' + 10;
			else if (c >= 'A' && c <= 'F')
				v |= c - 'A' + 10;
			else
				return 0;
		}
		if (i < 5 && s[3 * i + 2] != ':')
			return 0;
		mac[i] = v;
		any |= v;
	}
	return any && !(mac[0] & 1);    /* a unicast address */
}

/* "a.b.c.d/prefix" with a prefix from 8 to 30. */
static int parse_addr(const char *s, struct in_addr *addr, int *prefix)
{
	char buf[32];
	const char *slash = strchr(s, '/');
	char *end;
	long p;

	if (!slash || (size_t)(slash - s) >= sizeof(buf))
		return 0;
	memcpy(buf, s, slash - s);
	buf[slash - s] = '\0';
	if (inet_pton(AF_INET, buf, addr) != 1)
		return 0;
	errno = 0;
	p = strtol(slash + 1, &end, 10);
	if (errno || *end || end == slash + 1 || p < 8 || p > 30)
		return 0;
	*prefix = (int)p;
	return 1;
}

/* "CONODE_NAME=value": upper-case name, printable value without newlines. */
static int valid_env(const char *s)
{
	const char *eq = strchr(s, '=');
	size_t name_len;

	if (!eq || strncmp(s, "CONODE_", 7) != 0)
		return 0;
	name_len = eq - s;
	if (name_len <= 7 || name_len > MAX_ENV_NAME || strlen(eq + 1) > MAX_ENV_VALUE)
		return 0;
	for (const char *p = s; p < eq; p++)
		if (!((*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '_'))
			return 0;
	for (const char *p = eq + 1; *p; p++)
		if (*p < 0x20 || *p > 0x7e)
			return 0;
	return 1;
}

/* Check the whole payload into id; NULL, or what is wrong with it. */
static const char *parse_identity(const unsigned char *data, uint32_t len, struct identity *id)
{
	int have_mac = 0, have_addr = 0;
	size_t pos = 0;

	memset(id, 0, sizeof(*id));
	if (len == 0 || data[len - 1] != '\0')
		return "malformed payload";
	while (pos < len) {
		const char *field = (const char *)data + pos;

		pos += strlen(field) + 1;
		if (strncmp(field, "mac=", 4) == 0) {
			if (!parse_mac(field + 4, id->mac))
				return "mac is not a unicast xx:xx:xx:xx:xx:xx";
			have_mac = 1;
		} else if (strncmp(field, "addr=", 5) == 0) {
			if (!parse_addr(field + 5, &id->addr, &id->prefix))
				return "addr is not a.b.c.d/prefix (prefix 8 to 30)";
			have_addr = 1;
		} else if (strncmp(field, "hostname=", 9) == 0) {
			if (!valid_hostname(field + 9))
				return "hostname is not a host name";
			id->hostname = field + 9;
		} else if (strncmp(field, "host=", 5) == 0) {
			const char *space = strchr(field + 5, ' ');
			char buf[16];

			if (id->nhosts == MAX_HOSTS)
				return "too many hosts";
			if (!space || space - (field + 5) >= (long)sizeof(buf))
				return "host is not \"a.b.c.d name\"";
			memcpy(buf, field + 5, space - (field + 5));
			buf[space - (field + 5)] = '\0';
			if (inet_pton(AF_INET, buf, &id->host_addr[id->nhosts]) != 1 ||
			    !valid_hostname(space + 1))
				return "host is not \"a.b.c.d name\"";
			id->host_name[id->nhosts++] = space + 1;
		} else if (strncmp(field, "env=", 4) == 0) {
			if (id->nenv == MAX_ENV)
				return "too many environment variables";
			if (!valid_env(field + 4))
				return "env is not CONODE_NAME=printable text";
			id->env[id->nenv++] = field + 4;
		} else {
			return "unknown field";
		}
	}
	if (!have_mac || !have_addr || !id->hostname)
		return "mac, addr and hostname are required";
	return NULL;
}

static int write_file_atomically(const char *path, const char *text, size_t len)
{
	char tmp[64];
	int fd;

	snprintf(tmp, sizeof(tmp), "%s.new", path);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return -1;
	if (write_all(fd, text, len) < 0 || close(fd) < 0) {
		unlink(tmp);
		return -1;
	}
	return rename(tmp, path);
}

static int write_hosts(const struct identity *id)
{
	/* localhost, then one line per guest: at most 16 + 1 + 63 + 1 bytes each */
	static char text[64 + MAX_HOSTS * 96];
	size_t n = snprintf(text, sizeof(text), "127.0.0.1\tlocalhost\n");

	for (size_t i = 0; i < id->nhosts; i++) {
		char addr[INET_ADDRSTRLEN];

		inet_ntop(AF_INET, &id->host_addr[i], addr, sizeof(addr));
		n += snprintf(text + n, sizeof(text) - n, "%s\t%s\n", addr, id->host_name[i]);
	}
	return write_file_atomically("/etc/hosts", text, n);
}

/* eth0: down, MAC, address and netmask (the kernel adds the route to the
 * network), up. */
static const char *configure_nic(const struct identity *id)
{
	struct ifreq ifr;
	struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
	const char *step;
	short flags;
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return "socket";
	memset(&ifr, 0, sizeof(ifr));
	strncpy(ifr.ifr_name, NET_IFACE, IFNAMSIZ - 1);
	step = "get flags";
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0)
		goto fail;
	flags = ifr.ifr_flags;
	ifr.ifr_flags = flags & ~IFF_UP;
	step = "down";
	if (ioctl(fd, SIOCSIFFLAGS, &ifr) < 0)
		goto fail;
	ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
	memcpy(ifr.ifr_hwaddr.sa_data, id->mac, 6);
	step = "set MAC";
	if (ioctl(fd, SIOCSIFHWADDR, &ifr) < 0)
		goto fail;
	memset(&ifr.ifr_addr, 0, sizeof(ifr.ifr_addr));
	sin->sin_family = AF_INET;
	sin->sin_addr = id->addr;
	step = "set address";
	if (ioctl(fd, SIOCSIFADDR, &ifr) < 0)
		goto fail;
	sin->sin_addr.s_addr = htonl(~0u << (32 - id->prefix));
	step = "set netmask";
	if (ioctl(fd, SIOCSIFNETMASK, &ifr) < 0)
		goto fail;
	ifr.ifr_flags = flags | IFF_UP;
	step = "up";
	if (ioctl(fd, SIOCSIFFLAGS, &ifr) < 0)
		goto fail;
	close(fd);
	return NULL;
fail:
	flags = errno;
	close(fd);
	errno = flags;
	return step;
}

static void handle_identity(uint32_t id_, const unsigned char *data, uint32_t len)
{
	static struct identity id;
	const char *problem = parse_identity(data, len, &id);

	if (problem) {
		send_error(id_, "identity: %s", problem);
		return;
	}
	problem = configure_nic(&id);
	if (problem) {
		send_error(id_, "identity: %s %s: %s", NET_IFACE, problem, strerror(errno));
		return;
	}
	if (sethostname(id.hostname, strlen(id.hostname)) < 0 ||
	    write_file_atomically("/etc/hostname", id.hostname, strlen(id.hostname)) < 0 ||
	    write_hosts(&id) < 0) {
		send_error(id_, "identity: hostname or /etc/hosts: %s", strerror(errno));
		return;
	}
	for (size_t i = 0; i < id.nenv; i++) {
		char name[MAX_ENV_NAME + 1];
		const char *eq = strchr(id.env[i], '=');

		memcpy(name, id.env[i], eq - id.env[i]);
		name[eq - id.env[i]] = '\0';
		if (setenv(name, eq + 1, 1) < 0) {
			send_error(id_, "identity: setenv: %s", strerror(errno));
			return;
		}
	}
	send_frame('A', id_, NULL, 0);
}

static void handle_quit(void)
{
	sync();
	if (!pid1_mode) {
		logmsg("quit");
		exit(0);
	}
	reboot(RB_POWER_OFF);
	/* Only reached if the kernel refused. */
	logmsg("power off failed: %s", strerror(errno));
}

/* ------------------------------------------------------------------ */
/* Console input                                                       */
/* ------------------------------------------------------------------ */

static void dispatch(uint8_t type, uint32_t id, const unsigned char *data, uint32_t len)
{
	switch (type) {
	case 'X': handle_exec(id, data, len); break;
	case 'K': handle_kill(id, data, len); break;
	case 'P': handle_put(id, data, len); break;
	case 'D': handle_data(id, data, len); break;
	case 'G': handle_get(id, data, len); break;
	case 'N': handle_renew(id, data, len); break;
	case 'I': handle_identity(id, data, len); break;
	case 'Q': handle_quit(); break;
	default:
		send_error(id, "unknown frame type 0x%02x", type);
		break;
	}
}

/* Handle every complete frame in rbuf; keep an incomplete tail for later. */
static void parse_frames(void)
{
	size_t pos = 0;

	for (;;) {
		size_t avail = rbuf_len - pos;
		uint32_t id, len;
		uint8_t type;

		if (skip_bytes) {
			size_t n = avail < skip_bytes ? avail : (size_t)skip_bytes;

			pos += n;
			skip_bytes -= n;
			if (skip_bytes)
				break;
			continue;
		}
		if (avail < HDR_LEN)
			break;
		type = rbuf[pos];
		id = get_le32(rbuf + pos + 1);
		len = get_le32(rbuf + pos + 5);
		if (len > MAX_PAYLOAD) {
			send_error(id, "frame too large (%u bytes, limit %u)",
				   len, MAX_PAYLOAD);
			pos += HDR_LEN;
			skip_bytes = len;
			continue;
		}
		if (avail < HDR_LEN + (size_t)len)
			break;
		dispatch(type, id, rbuf + pos + HDR_LEN, len);
		pos += HDR_LEN + len;
	}
	memmove(rbuf, rbuf + pos, rbuf_len - pos);
	rbuf_len -= pos;
}

/* Read what the host sent.  Returns -1 when the console is gone. */
static int read_console(void)
{
	ssize_t n;

	if (rbuf_cap - rbuf_len < READ_SIZE) {
		rbuf_cap = rbuf_len + READ_SIZE;
		rbuf = xrealloc(rbuf, rbuf_cap);
	}
	do
		n = read(hvc_fd, rbuf + rbuf_len, READ_SIZE);
	while (n < 0 && errno == EINTR);
	if (n < 0 && errno == EAGAIN)
		return 0;
	if (n <= 0)
		return -1;
	rbuf_len += n;
	parse_frames();
	return 0;
}

/* Open the console and make it a clean 8-bit channel: no echo, no line
 * editing, no CR/LF translation, no flow-control characters. */
/* Open `path` as a raw, 8-bit clean byte stream; -1 (errno set) if it cannot be opened. */
static int open_raw(const char *path)
{
	struct termios tio;
	int fd = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);

	if (fd < 0)
		return -1;
	if (tcgetattr(fd, &tio) == 0) {
		cfmakeraw(&tio);
		tio.c_cflag &= ~CRTSCTS;
		tio.c_cflag |= CLOCAL;
		tio.c_cc[VMIN] = 1;
		tio.c_cc[VTIME] = 0;
		if (tcsetattr(fd, TCSANOW, &tio) < 0)
			logmsg("%s: cannot set raw mode: %s", path, strerror(errno));
	}
	return fd;
}

static int open_console(void)
{
	int fd = -1;

	if (!default_device || access(VIRTIO_CONSOLE_DRIVER, F_OK) == 0) {
		/* The hvc driver creates /dev/hvc0..7 early, but hvc0 only
		 * works once the virtio console has registered its port, which
		 * can happen after /init started (ports of a multiport device
		 * are added from a work queue).  Until then the open fails
		 * (ENOENT, ENODEV, ...): retry for about two seconds. */
		for (int tries = 0; ; tries++) {
			fd = open_raw(device_path);
			if (fd >= 0 || !pid1_mode || tries == 20)
				break;
			usleep(100 * 1000);
		}
	} else {
		errno = ENOENT;
	}
	if (fd < 0 && default_device) {
		/* A kernel without a virtio console (a distribution kernel
		 * builds it as a module): the host also listens on COM2, which
		 * every PC kernel drives.  An absent UART fails to open. */
		int saved = errno;
		struct serial_struct port;

		fd = open_raw(SERIAL_CHANNEL);
		/* The 8250 driver keeps a node for every legacy port; one
		 * with no UART behind it opens, then fails every write. */
		if (fd >= 0 && ioctl(fd, TIOCGSERIAL, &port) == 0 && port.type == 0 /* PORT_UNKNOWN */) {
			close(fd);
			fd = -1;
		}
		if (fd >= 0)
			device_path = SERIAL_CHANNEL;
		else
			errno = saved;
	}
	return fd;      /* on failure errno is that of the virtio console's open() */
}

static void send_ready(void)
{
	struct utsname u;
	char buf[3 * sizeof(u.release) + 3];
	int n;

	if (uname(&u) < 0) {
		send_frame('R', 0, NULL, 0);
		return;
	}
	n = snprintf(buf, sizeof(buf), "%s %s %s", u.sysname, u.release, u.machine);
	if (n >= (int)sizeof(buf))
		n = sizeof(buf) - 1;
	send_frame('R', 0, buf, n);
}

/* Tell the user on the console that the host channel is missing. */
static void report_missing_console(void)
{
	char msg[256];
	int fd, n;

	n = snprintf(msg, sizeof(msg),
		     "coagent: cannot open %s (%s): no host channel; %s\n",
		     device_path, strerror(errno),
		     want_shell ? "only the serial shell will run" :
		     pid1_mode ? "powering off" : "exiting");
	fd = pid1_mode ? open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC) : -1;
	if (fd >= 0) {
		write_all(fd, msg, n);
		/* The serial driver sends in the background: wait until the
		 * line is out, or a power-off right after would swallow it. */
		tcdrain(fd);
		close(fd);
	} else {
		write_all(STDERR_FILENO, msg, n);
	}
}

/* ------------------------------------------------------------------ */
/* Main loop                                                           */
/* ------------------------------------------------------------------ */

static void usage(const char *prog)
{
	fprintf(stderr, "usage: %s [--device PATH] [--no-pid1]\n", prog);
	exit(2);
}

static void setup_signals(void)
{
	struct sigaction sa;

	if (pipe2(sigchld_pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
		logmsg("pipe: %s", strerror(errno));
		exit(1);
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = sigchld_handler;
	sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGCHLD, &sa, NULL);
	/* A write to a vanished reader must be an error, not our death. */
	signal(SIGPIPE, SIG_IGN);
}

int main(int argc, char **argv)
{
	struct pollfd *pfds = NULL;
	size_t cap_pfds = 0;

	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--device") == 0 && i + 1 < argc) {
			device_path = argv[++i];
			default_device = 0;
		} else if (strcmp(argv[i], "--no-pid1") == 0)
			pid1_mode = 0;
		else
			usage(argv[0]);
	}

	/* Make sure 0, 1 and 2 are taken, so that no pipe or device we open
	 * later lands there and gets clobbered by a child's dup2(). */
	for (;;) {
		int fd = open("/dev/null", O_RDWR);

		if (fd < 0 || fd > STDERR_FILENO) {
			if (fd >= 0)
				close(fd);
			break;
		}
	}

	setup_signals();
	/* Outside PID 1, still collect orphaned grandchildren like init does. */
	if (!pid1_mode)
		prctl(PR_SET_CHILD_SUBREAPER, 1);

	want_shell = cmdline_wants_shell();
	hvc_fd = open_console();
	if (hvc_fd < 0) {
		report_missing_console();
		if (!want_shell) {
			if (!pid1_mode)
				exit(1);
			sync();
			reboot(RB_POWER_OFF);
			/* If even that fails, PID 1 must not exit: idle. */
			for (;;)
				pause();
		}
	} else {
		send_ready();
	}
	if (want_shell)
		spawn_shell();

	for (;;) {
		size_t n = 0, need = 2 + 2 * njobs;
		int timeout = -1;
		int hvc_idx = -1;

		if (need > cap_pfds) {
			cap_pfds = need * 2;
			pfds = xrealloc(pfds, cap_pfds * sizeof(*pfds));
		}
		pfds[n++] = (struct pollfd){ .fd = sigchld_pipe[0], .events = POLLIN };
		if (hvc_fd >= 0) {
			hvc_idx = n;
			pfds[n++] = (struct pollfd){ .fd = hvc_fd, .events = POLLIN };
		}
		/* Output pipes: the order in pfds does not matter, each job's
		 * frames are sent in the order its pipe delivers them. */
		for (size_t i = 0; i < njobs; i++) {
			pfds[n++] = (struct pollfd){ .fd = jobs[i].out_fd, .events = POLLIN };
			pfds[n++] = (struct pollfd){ .fd = jobs[i].err_fd, .events = POLLIN };
		}
		if (shell_respawn_at) {
			time_t now = time(NULL);

			timeout = shell_respawn_at > now ?
				  (int)(shell_respawn_at - now) * 1000 : 0;
		}

		if (poll(pfds, n, timeout) < 0) {
			if (errno == EINTR)
				continue;
			logmsg("poll: %s", strerror(errno));
			sleep(1);
			continue;
		}

		if (pfds[0].revents) {
			char drain[64];

			while (read(sigchld_pipe[0], drain, sizeof(drain)) > 0)
				;
		}

		/* Output first: pipes that were readable in this round are
		 * drained before the child's exit is looked at, which keeps
		 * the wait short for a job whose output is complete. */
		for (size_t i = 0, k = (hvc_idx >= 0 ? 2 : 1); i < njobs; i++, k += 2) {
			/* A pipe closed earlier was polled as fd -1 (ignored). */
			if (pfds[k].revents && jobs[i].out_fd >= 0)
				pump_pipe(&jobs[i], &jobs[i].out_fd, 'O');
			if (pfds[k + 1].revents && jobs[i].err_fd >= 0)
				pump_pipe(&jobs[i], &jobs[i].err_fd, 'E');
		}
		/* Finished jobs are removed only now, so that the indexes into
		 * pfds stayed valid above. */
		for (size_t i = njobs; i-- > 0; )
			finish_job_if_done(i);

		reap_children();

		if (hvc_idx >= 0 && pfds[hvc_idx].revents) {
			if (read_console() < 0) {
				if (!pid1_mode) {
					logmsg("%s closed, exiting", device_path);
					exit(0);
				}
				/* PID 1 must not exit; wait for the host to
				 * come back instead of spinning. */
				logmsg("%s: read failed, retrying", device_path);
				sleep(1);
			}
		}

		if (want_shell && shell_pid < 0 && shell_respawn_at &&
		    time(NULL) >= shell_respawn_at)
			spawn_shell();
	}
}
