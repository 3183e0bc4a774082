/*
 * loadgen: plays QEMU's part for the host agent benchmark (bench/bench_agent.py).
 *
 * QEMU binds each VM power channel (an AF_UNIX stream socket) and the host agent
 * connects to it as the client (docs/protocol.md, "Transport"). This program
 * binds N such sockets, tells the bench it is ready, accepts the agent on each, then
 * drives DPDK-format CPU_POWER requests (464-byte packets, little-endian, command 1,
 * unit alternating SCALE_UP 1 / SCALE_DOWN 2, resource_id = a vCPU the VM owns) and
 * reads the 464-byte replies, checking each is an ACK (command 1).
 *
 * Modes:
 *   latency     one channel (the first given), one request in flight: round trip
 *               from the send to the last byte of the reply, CLOCK_MONOTONIC ns.
 *   throughput  every channel given, WINDOW requests in flight on each (epoll; every
 *               reply read is replaced by a new request at once): replies per second.
 *
 * Usage:
 *   loadgen latency    [--requests K] [--warmup K] [--accept-timeout-s S] PATH:VCPU...
 *   loadgen throughput [--duration-s T] [--warmup-s T] [--window W]
 *                      [--accept-timeout-s S] PATH:VCPU...
 *
 * stdout, one line each, for the bench to follow: "bound" (every socket listens: start
 * the agent now), "accepted" (the agent connected to every socket), "measuring" (the
 * warm-up is over), then one JSON object with the figures. Errors go to stderr and
 * the exit code is 1 (2 for bad arguments).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PROG "loadgen"
#include "common.h"

#define MAX_WINDOW 256

struct channel {
	const char *path;
	uint64_t vcpu;
	int listen_fd;
	int fd;
	unsigned next_unit; /* toggles SCALE_UP / SCALE_DOWN */
	int inflight;
	unsigned char *rx;
	size_t rx_len;
	unsigned char *tx;
	size_t tx_len; /* bytes queued in tx */
	size_t tx_off; /* bytes of tx already sent */
	int want_out;  /* EPOLLOUT registered */
};

static void say(const char *line)
{
	/* The bench reads these lines as they come: flush each one. */
	fputs(line, stdout);
	fputc('\n', stdout);
	fflush(stdout);
}

static uint32_t get_u32(const unsigned char *p)
{
	uint32_t v;
	memcpy(&v, p, sizeof v);
	return v;
}

/* ------------------------------------------------------------------------------ */
/* Sockets: bind every channel, then accept the agent on each. */

static void bind_channel(struct channel *ch)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	if (strlen(ch->path) >= sizeof addr.sun_path)
		die("%s: socket path longer than %zu bytes", ch->path, sizeof addr.sun_path - 1);
	strcpy(addr.sun_path, ch->path);
	unlink(ch->path); /* a socket file left by an earlier run */
	ch->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (ch->listen_fd < 0)
		die("socket: %s", strerror(errno));
	if (bind(ch->listen_fd, (struct sockaddr *)&addr, sizeof addr) < 0)
		die("bind %s: %s", ch->path, strerror(errno));
	if (listen(ch->listen_fd, 4) < 0)
		die("listen %s: %s", ch->path, strerror(errno));
}

static void accept_channel(struct channel *ch, uint64_t deadline_ns)
{
	struct pollfd pfd = {.fd = ch->listen_fd, .events = POLLIN};
	for (;;) {
		uint64_t now = now_ns();
		if (now >= deadline_ns)
			die("%s: the agent did not connect in time", ch->path);
		int ms = (int)((deadline_ns - now) / 1000000u) + 1;
		int n = poll(&pfd, 1, ms);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die("poll: %s", strerror(errno));
		if (n == 0)
			continue;
		ch->fd = accept4(ch->listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (ch->fd < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (ch->fd < 0)
			die("accept %s: %s", ch->path, strerror(errno));
		return;
	}
}

static void close_all(struct channel *chans, int n)
{
	for (int i = 0; i < n; i++) {
		if (chans[i].fd >= 0)
			close(chans[i].fd);
		if (chans[i].listen_fd >= 0)
			close(chans[i].listen_fd);
		unlink(chans[i].path);
	}
}

/* ------------------------------------------------------------------------------ */
/* Latency: blocking socket, one request in flight. */

static void write_all(int fd, const unsigned char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die("write: %s", strerror(errno));
		buf += n;
		len -= (size_t)n;
	}
}

static void read_all(int fd, unsigned char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = read(fd, buf, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die("read: %s", strerror(errno));
		if (n == 0)
			die("the agent closed the channel");
		buf += n;
		len -= (size_t)n;
	}
}

static void run_latency(struct channel *ch, long warmup, long requests)
{
	unsigned char pkt[PACKET_SIZE], reply[PACKET_SIZE];
	uint64_t *lat = calloc((size_t)requests, sizeof *lat);
	long nacks = 0;
	if (lat == NULL)
		die("out of memory");
	for (long i = 0; i < warmup + requests; i++) {
		if (i == warmup)
			say("measuring");
		build_request(pkt, ch->vcpu, &ch->next_unit);
		uint64_t t0 = now_ns();
		write_all(ch->fd, pkt, PACKET_SIZE);
		read_all(ch->fd, reply, PACKET_SIZE);
		uint64_t t1 = now_ns();
		uint32_t code = get_u32(reply + OFF_COMMAND);
		if (code != REPLY_ACK) {
			if (code != REPLY_NACK)
				die("reply with command %" PRIu32 " (neither ACK nor NACK)", code);
			nacks++;
		}
		if (i >= warmup)
			lat[i - warmup] = t1 - t0;
	}
	uint64_t sum = 0;
	for (long i = 0; i < requests; i++)
		sum += lat[i];
	qsort(lat, (size_t)requests, sizeof *lat, cmp_u64);
	printf("{\"mode\": \"latency\", \"requests\": %ld, \"nacks\": %ld, "
	       "\"min_ns\": %" PRIu64 ", \"p50_ns\": %" PRIu64 ", \"p90_ns\": %" PRIu64
	       ", \"p99_ns\": %" PRIu64 ", \"p999_ns\": %" PRIu64 ", \"max_ns\": %" PRIu64
	       ", \"mean_ns\": %" PRIu64 "}\n",
	       requests, nacks, lat[0], lat[requests * 50 / 100], lat[requests * 90 / 100],
	       lat[requests * 99 / 100], lat[requests * 999 / 1000], lat[requests - 1],
	       sum / (uint64_t)requests);
	fflush(stdout);
	free(lat);
}

/* ------------------------------------------------------------------------------ */
/* Throughput: non-blocking sockets, epoll, every channel's window kept full. */

static void set_out(int ep, struct channel *ch, int want)
{
	if (ch->want_out == want)
		return;
	struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = ch};
	if (epoll_ctl(ep, EPOLL_CTL_MOD, ch->fd, &ev) < 0)
		die("epoll_ctl: %s", strerror(errno));
	ch->want_out = want;
}

static void flush_tx(int ep, struct channel *ch)
{
	while (ch->tx_off < ch->tx_len) {
		ssize_t n = send(ch->fd, ch->tx + ch->tx_off, ch->tx_len - ch->tx_off, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN) {
			set_out(ep, ch, 1);
			return;
		}
		if (n < 0)
			die("%s: send: %s", ch->path, strerror(errno));
		ch->tx_off += (size_t)n;
	}
	ch->tx_off = ch->tx_len = 0;
	set_out(ep, ch, 0);
}

static void queue_requests(int ep, struct channel *ch, int count)
{
	/* tx holds at most one window: a request is queued only once its slot is free. */
	if (ch->tx_off > 0 && ch->tx_off == ch->tx_len)
		ch->tx_off = ch->tx_len = 0;
	if (ch->tx_off > 0) {
		memmove(ch->tx, ch->tx + ch->tx_off, ch->tx_len - ch->tx_off);
		ch->tx_len -= ch->tx_off;
		ch->tx_off = 0;
	}
	for (int i = 0; i < count; i++) {
		build_request(ch->tx + ch->tx_len, ch->vcpu, &ch->next_unit);
		ch->tx_len += PACKET_SIZE;
	}
	ch->inflight += count;
	flush_tx(ep, ch);
}

static void run_throughput(struct channel *chans, int n, int window, double warmup_s,
			   double duration_s)
{
	int ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		die("epoll_create1: %s", strerror(errno));
	for (int i = 0; i < n; i++) {
		struct channel *ch = &chans[i];
		ch->rx = malloc((size_t)window * PACKET_SIZE);
		ch->tx = malloc((size_t)window * PACKET_SIZE);
		if (ch->rx == NULL || ch->tx == NULL)
			die("out of memory");
		int flags = fcntl(ch->fd, F_GETFL);
		if (flags < 0 || fcntl(ch->fd, F_SETFL, flags | O_NONBLOCK) < 0)
			die("fcntl: %s", strerror(errno));
		struct epoll_event ev = {.events = EPOLLIN, .data.ptr = ch};
		if (epoll_ctl(ep, EPOLL_CTL_ADD, ch->fd, &ev) < 0)
			die("epoll_ctl: %s", strerror(errno));
	}
	for (int i = 0; i < n; i++)
		queue_requests(ep, &chans[i], window);

	uint64_t replies = 0, nacks = 0, replies_at_start = 0, nacks_at_start = 0;
	uint64_t start = now_ns();
	uint64_t measure_from = start + (uint64_t)(warmup_s * 1e9);
	uint64_t measure_to = measure_from + (uint64_t)(duration_s * 1e9);
	uint64_t t0 = 0, t1 = 0;
	int measuring = 0;
	struct epoll_event evs[128];
	for (;;) {
		uint64_t now = now_ns();
		if (!measuring && now >= measure_from) {
			measuring = 1;
			t0 = now;
			replies_at_start = replies;
			nacks_at_start = nacks;
			say("measuring");
		}
		if (measuring && now >= measure_to) {
			t1 = now;
			break;
		}
		uint64_t until = measuring ? measure_to : measure_from;
		int ms = (int)((until - now) / 1000000u) + 1;
		int ready = epoll_wait(ep, evs, 128, ms);
		if (ready < 0 && errno == EINTR)
			continue;
		if (ready < 0)
			die("epoll_wait: %s", strerror(errno));
		for (int e = 0; e < ready; e++) {
			struct channel *ch = evs[e].data.ptr;
			if (evs[e].events & EPOLLOUT)
				flush_tx(ep, ch);
			if (!(evs[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
				continue;
			size_t room = (size_t)window * PACKET_SIZE - ch->rx_len;
			ssize_t got = read(ch->fd, ch->rx + ch->rx_len, room);
			if (got < 0 && (errno == EAGAIN || errno == EINTR))
				continue;
			if (got < 0)
				die("%s: read: %s", ch->path, strerror(errno));
			if (got == 0)
				die("%s: the agent closed the channel", ch->path);
			ch->rx_len += (size_t)got;
			int whole = (int)(ch->rx_len / PACKET_SIZE);
			if (whole > ch->inflight)
				die("%s: more replies than requests", ch->path);
			for (int k = 0; k < whole; k++) {
				uint32_t code = get_u32(ch->rx + (size_t)k * PACKET_SIZE + OFF_COMMAND);
				if (code == REPLY_NACK)
					nacks++;
				else if (code != REPLY_ACK)
					die("%s: reply with command %" PRIu32, ch->path, code);
			}
			size_t used = (size_t)whole * PACKET_SIZE;
			memmove(ch->rx, ch->rx + used, ch->rx_len - used);
			ch->rx_len -= used;
			ch->inflight -= whole;
			replies += (uint64_t)whole;
			if (whole)
				queue_requests(ep, ch, whole);
		}
	}
	double elapsed_s = (double)(t1 - t0) / 1e9;
	uint64_t counted = replies - replies_at_start;
	printf("{\"mode\": \"throughput\", \"channels\": %d, \"window\": %d, "
	       "\"duration_s\": %.6f, \"replies\": %" PRIu64 ", \"nacks\": %" PRIu64
	       ", \"requests_per_s\": %.1f}\n",
	       n, window, elapsed_s, counted, nacks - nacks_at_start, (double)counted / elapsed_s);
	fflush(stdout);
	close(ep);
}

/* ------------------------------------------------------------------------------ */

static double parse_seconds(const char *opt, const char *text)
{
	char *end;
	errno = 0;
	double v = strtod(text, &end);
	if (errno || *end || end == text || v < 0 || v > 3600) {
		fprintf(stderr, "loadgen: %s must be seconds in 0-3600, got %s\n", opt, text);
		exit(2);
	}
	return v;
}

static void usage(void)
{
	fputs("usage: loadgen latency [--requests K] [--warmup K] [--accept-timeout-s S] "
	      "PATH:VCPU...\n"
	      "       loadgen throughput [--duration-s T] [--warmup-s T] [--window W] "
	      "[--accept-timeout-s S] PATH:VCPU...\n",
	      stderr);
	exit(2);
}

int main(int argc, char **argv)
{
	if (argc < 2)
		usage();
	const char *mode = argv[1];
	int latency = strcmp(mode, "latency") == 0;
	if (!latency && strcmp(mode, "throughput") != 0)
		usage();
	long requests = 20000, warmup = 2000, window = 16;
	double duration_s = 3.0, warmup_s = 1.0, accept_timeout_s = 60.0;
	int first = 2;
	while (first < argc && strncmp(argv[first], "--", 2) == 0) {
		const char *opt = argv[first];
		if (first + 1 >= argc)
			usage();
		const char *val = argv[first + 1];
		if (strcmp(opt, "--requests") == 0)
			requests = parse_long(opt, val, 1, 100000000);
		else if (strcmp(opt, "--warmup") == 0)
			warmup = parse_long(opt, val, 0, 100000000);
		else if (strcmp(opt, "--window") == 0)
			window = parse_long(opt, val, 1, MAX_WINDOW);
		else if (strcmp(opt, "--duration-s") == 0)
			duration_s = parse_seconds(opt, val);
		else if (strcmp(opt, "--warmup-s") == 0)
			warmup_s = parse_seconds(opt, val);
		else if (strcmp(opt, "--accept-timeout-s") == 0)
			accept_timeout_s = parse_seconds(opt, val);
		else
			usage();
		first += 2;
	}
	int n = argc - first;
	if (n < 1)
		usage();
	struct channel *chans = calloc((size_t)n, sizeof *chans);
	if (chans == NULL)
		die("out of memory");
	for (int i = 0; i < n; i++) {
		char *spec = argv[first + i];
		char *colon = strrchr(spec, ':');
		if (colon == NULL || colon == spec) {
			fprintf(stderr, "loadgen: channel %s: expected PATH:VCPU\n", spec);
			exit(2);
		}
		*colon = '\0';
		chans[i].path = spec;
		chans[i].vcpu = (uint64_t)parse_long("VCPU", colon + 1, 0, 1 << 20);
		chans[i].fd = chans[i].listen_fd = -1;
	}

	for (int i = 0; i < n; i++)
		bind_channel(&chans[i]);
	say("bound");
	uint64_t deadline = now_ns() + (uint64_t)(accept_timeout_s * 1e9);
	for (int i = 0; i < n; i++)
		accept_channel(&chans[i], deadline);
	say("accepted");

	if (latency)
		run_latency(&chans[0], warmup, requests);
	else
		run_throughput(chans, n, (int)window, warmup_s, duration_s);
	close_all(chans, n);
	return 0;
}
