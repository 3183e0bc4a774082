/*
 * qemustub: plays QEMU for thousands of VMs at once (bench/bench_scale.py, issue #16).
 *
 * QEMU binds each VM power channel (an AF_UNIX stream socket) and the host agent
 * connects to it as the client (docs/protocol.md, "Transport"). This program binds
 * every channel listed in a spec file (one "PATH VCPU" per line: thousands of
 * channels do not fit in argv), prints "bound", and accepts the agent on each. When
 * every channel is accepted it prints "accepted T" (T: CLOCK_MONOTONIC ns of the last
 * first accept). Unlike QEMU it closes each listener once its channel is accepted: 4000
 * VMs x 4 channels would otherwise need 32 000 fds (this machine allows 20 000); with
 * --keep-listeners it keeps them, so a channel the agent closes (rm_vm) and connects
 * again (add_vm) is accepted again.
 *
 * It then answers nothing by itself: it reads commands on stdin, one per line:
 *
 *   load RATE DURATION_S FIRST COUNT
 *       send RATE DPDK CPU_POWER requests per second (paced, SCALE_UP/SCALE_DOWN
 *       alternating per channel, resource_id the channel's vCPU) for DURATION_S,
 *       round-robin over channels FIRST..FIRST+COUNT-1 of the spec file, at most one
 *       request in flight per channel (a channel still waiting is passed over and
 *       counted in "skipped"); then waits up to 2 s for the last replies and prints one
 *       JSON line: sent, replies, nacks, skipped, lost, p50/p99/p999/max round trip (ns,
 *       send to the reply's last byte).
 *   quit
 *
 * Errors go to stderr and the exit code is 1 (2 for bad arguments).
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

#define PROG "qemustub"
#include "common.h"

struct channel {
	char *path;
	uint64_t vcpu;
	int listen_fd;
	int fd;
	unsigned next_unit;
	int inflight;
	int accepted; /* accepted at least once */
	uint64_t sent_ns;
	unsigned char rx[PACKET_SIZE];
	size_t rx_len;
};

/* epoll data: channel index, with the top bit set for a listener */
#define LISTENER (1ull << 63)

static struct channel *chans;
static int n_chans;
static int ep;

static void load_specs(const char *file)
{
	FILE *f = fopen(file, "r");
	if (f == NULL)
		die("%s: %s", file, strerror(errno));
	int cap = 1024;
	chans = calloc((size_t)cap, sizeof *chans);
	char line[4200];
	while (fgets(line, sizeof line, f)) {
		char *space = strrchr(line, ' ');
		if (space == NULL)
			die("%s: expected PATH VCPU, got %s", file, line);
		*space = '\0';
		if (n_chans == cap) {
			cap *= 2;
			chans = realloc(chans, (size_t)cap * sizeof *chans);
			if (chans == NULL)
				die("out of memory");
		}
		struct channel *ch = &chans[n_chans++];
		memset(ch, 0, sizeof *ch);
		ch->path = strdup(line);
		ch->vcpu = strtoull(space + 1, NULL, 10);
		ch->fd = ch->listen_fd = -1;
	}
	fclose(f);
	if (n_chans == 0)
		die("%s: no channel", file);
}

static void bind_all(void)
{
	for (int i = 0; i < n_chans; i++) {
		struct channel *ch = &chans[i];
		struct sockaddr_un addr = {.sun_family = AF_UNIX};
		if (strlen(ch->path) >= sizeof addr.sun_path)
			die("%s: socket path too long", ch->path);
		strcpy(addr.sun_path, ch->path);
		unlink(ch->path);
		ch->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (ch->listen_fd < 0)
			die("socket: %s", strerror(errno));
		if (bind(ch->listen_fd, (struct sockaddr *)&addr, sizeof addr) < 0)
			die("bind %s: %s", ch->path, strerror(errno));
		if (listen(ch->listen_fd, 4) < 0)
			die("listen %s: %s", ch->path, strerror(errno));
		struct epoll_event ev = {.events = EPOLLIN, .data.u64 = LISTENER | (uint64_t)i};
		if (epoll_ctl(ep, EPOLL_CTL_ADD, ch->listen_fd, &ev) < 0)
			die("epoll_ctl: %s", strerror(errno));
	}
}

/* The agent closed the channel (rm_vm): a request in flight on it is lost. */
static void drop_channel(struct channel *ch)
{
	epoll_ctl(ep, EPOLL_CTL_DEL, ch->fd, NULL);
	close(ch->fd);
	ch->fd = -1;
	ch->inflight = 0;
	ch->rx_len = 0;
}

static void on_readable(int i, uint64_t *lat, uint64_t *n_lat, uint64_t *nacks)
{
	struct channel *ch = &chans[i];
	if (ch->fd < 0)
		return; /* closed earlier in this batch of events */
	for (;;) {
		ssize_t got = read(ch->fd, ch->rx + ch->rx_len, PACKET_SIZE - ch->rx_len);
		if (got < 0 && (errno == EAGAIN || errno == EINTR))
			return;
		if (got == 0 || (got < 0 && errno == ECONNRESET)) {
			drop_channel(ch); /* the agent closed it (rm_vm) */
			return;
		}
		if (got < 0)
			die("%s: read: %s", ch->path, strerror(errno));
		ch->rx_len += (size_t)got;
		if (ch->rx_len < PACKET_SIZE)
			continue;
		uint64_t t = now_ns();
		uint32_t code;
		memcpy(&code, ch->rx + OFF_COMMAND, sizeof code);
		if (code == REPLY_NACK && nacks != NULL)
			(*nacks)++;
		else if (code != REPLY_ACK)
			die("%s: reply with command %" PRIu32, ch->path, code);
		ch->rx_len = 0;
		if (!ch->inflight)
			continue; /* the reply to a request given up as lost */
		ch->inflight = 0;
		if (lat != NULL)
			lat[(*n_lat)++] = t - ch->sent_ns;
	}
}

static int keep_listeners; /* --keep-listeners: a channel the agent closes can be re-accepted */

/* A listener is readable: accept the agent (again); 1 if the channel had no peer yet. */
static int on_listener(int i)
{
	struct channel *ch = &chans[i];
	int fd = accept4(ch->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
	if (fd < 0 && (errno == EAGAIN || errno == EINTR))
		return 0;
	if (fd < 0)
		die("accept %s: %s", ch->path, strerror(errno));
	int first = !ch->accepted;
	ch->accepted = 1;
	if (ch->fd >= 0)
		close(ch->fd); /* the agent connected again: the new connection wins */
	if (!keep_listeners) {
		epoll_ctl(ep, EPOLL_CTL_DEL, ch->listen_fd, NULL);
		close(ch->listen_fd);
		ch->listen_fd = -1;
	}
	ch->fd = fd;
	ch->inflight = 0;
	ch->rx_len = 0;
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)i};
	if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
		die("epoll_ctl: %s", strerror(errno));
	return first;
}

static void on_event(uint64_t data, uint64_t *lat, uint64_t *n_lat, uint64_t *nacks)
{
	if (data & LISTENER)
		on_listener((int)(data & ~LISTENER));
	else
		on_readable((int)data, lat, n_lat, nacks);
}

static void accept_all(void)
{
	int left = n_chans;
	uint64_t last = 0;
	struct epoll_event evs[256];
	while (left > 0) {
		int ready = epoll_wait(ep, evs, 256, 60000);
		if (ready < 0 && errno == EINTR)
			continue;
		if (ready < 0)
			die("epoll_wait: %s", strerror(errno));
		if (ready == 0)
			die("%d channel(s) not accepted in 60 s", left);
		for (int e = 0; e < ready; e++) {
			uint64_t data = evs[e].data.u64;
			if (!(data & LISTENER)) {
				on_readable((int)data, NULL, NULL, NULL);
				continue;
			}
			if (on_listener((int)(data & ~LISTENER))) {
				last = now_ns();
				left--;
			}
		}
	}
	printf("accepted %" PRIu64 "\n", last);
	fflush(stdout);
}

/* 1 when the request went out, 0 when the channel turned out closed. */
static int send_request(struct channel *ch)
{
	unsigned char pkt[PACKET_SIZE];
	build_request(pkt, ch->vcpu, &ch->next_unit);
	ch->sent_ns = now_ns();
	ssize_t n = send(ch->fd, pkt, PACKET_SIZE, MSG_NOSIGNAL);
	if (n < 0 && (errno == EPIPE || errno == ECONNRESET)) {
		/* closed by the agent (rm_vm) after this turn's events were read: the
		 * request is lost, as one in flight at the close would be */
		drop_channel(ch);
		return 0;
	}
	if (n != PACKET_SIZE) /* an idle socket buffer always takes one packet */
		die("%s: send: %s", ch->path, n < 0 ? strerror(errno) : "short");
	ch->inflight = 1;
	return 1;
}

static void run_load(double rate, double duration_s, int first, int count)
{
	if (first < 0 || count < 1 || first + count > n_chans || rate <= 0)
		die("load: bad arguments");
	uint64_t total = (uint64_t)(rate * duration_s) + 1;
	uint64_t *lat = malloc(total * sizeof *lat);
	if (lat == NULL)
		die("out of memory");
	uint64_t n_lat = 0, sent = 0, skipped = 0, nacks = 0;
	uint64_t t0 = now_ns(), end = t0 + (uint64_t)(duration_s * 1e9);
	double gap_ns = 1e9 / rate;
	int next = 0;
	struct epoll_event evs[256];
	for (;;) {
		uint64_t now = now_ns();
		if (now >= end)
			break;
		/* every request due by now goes out (a late wake-up catches up) */
		while (sent + skipped < total && t0 + (uint64_t)((double)(sent + skipped) * gap_ns) <= now) {
			struct channel *ch = &chans[first + next];
			next = (next + 1) % count;
			if (ch->inflight || ch->fd < 0 || !send_request(ch))
				skipped++;
			else
				sent++;
		}
		uint64_t due = t0 + (uint64_t)((double)(sent + skipped) * gap_ns);
		if (due > end)
			due = end;
		/* sleep until the next request is due (ppoll: sub-millisecond, no spinning) */
		uint64_t wait_ns = due > now ? due - now : 0;
		struct timespec ts = {.tv_sec = (time_t)(wait_ns / 1000000000u),
				      .tv_nsec = (long)(wait_ns % 1000000000u)};
		struct pollfd pfd = {.fd = ep, .events = POLLIN};
		if (ppoll(&pfd, 1, &ts, NULL) < 0 && errno != EINTR)
			die("ppoll: %s", strerror(errno));
		int ready = epoll_wait(ep, evs, 256, 0);
		if (ready < 0 && errno == EINTR)
			continue;
		if (ready < 0)
			die("epoll_wait: %s", strerror(errno));
		for (int e = 0; e < ready; e++)
			on_event(evs[e].data.u64, lat, &n_lat, &nacks);
	}
	uint64_t wait_to = now_ns() + 2000000000u;
	while (n_lat < sent && now_ns() < wait_to) {
		int ready = epoll_wait(ep, evs, 256, 10);
		for (int e = 0; e < ready; e++)
			on_event(evs[e].data.u64, lat, &n_lat, &nacks);
	}
	uint64_t lost = sent - n_lat; /* no reply in 2 s, or the channel closed under it */
	for (int i = first; i < first + count; i++)
		chans[i].inflight = 0; /* a late reply after this is dropped in on_readable */
	qsort(lat, n_lat, sizeof *lat, cmp_u64);
	uint64_t p50 = 0, p99 = 0, p999 = 0, mx = 0;
	if (n_lat) {
		p50 = lat[n_lat / 2];
		p99 = lat[(uint64_t)((double)n_lat * 0.99)];
		p999 = lat[(uint64_t)((double)n_lat * 0.999)];
		mx = lat[n_lat - 1];
	}
	printf("{\"sent\": %" PRIu64 ", \"replies\": %" PRIu64 ", \"nacks\": %" PRIu64
	       ", \"skipped\": %" PRIu64 ", \"lost\": %" PRIu64 ", \"p50_ns\": %" PRIu64
	       ", \"p99_ns\": %" PRIu64 ", \"p999_ns\": %" PRIu64 ", \"max_ns\": %" PRIu64 "}\n",
	       sent, n_lat, nacks, skipped, lost, p50, p99, p999, mx);
	fflush(stdout);
	free(lat);
}

int main(int argc, char **argv)
{
	if (argc == 3 && strcmp(argv[1], "--keep-listeners") == 0) {
		keep_listeners = 1;
		argv++;
		argc--;
	}
	if (argc != 2) {
		fputs("usage: qemustub [--keep-listeners] SPEC_FILE\n"
		      "  (one \"PATH VCPU\" per line; commands on stdin)\n",
		      stderr);
		return 2;
	}
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		die("epoll_create1: %s", strerror(errno));
	load_specs(argv[1]);
	bind_all();
	puts("bound");
	fflush(stdout);
	accept_all();
	char line[256];
	while (fgets(line, sizeof line, stdin)) {
		double rate, duration_s;
		int first, count;
		if (strncmp(line, "quit", 4) == 0)
			break;
		if (sscanf(line, "load %lf %lf %d %d", &rate, &duration_s, &first, &count) == 4)
			run_load(rate, duration_s, first, count);
		else
			die("unknown command: %s", line);
	}
	for (int i = 0; i < n_chans; i++) {
		if (chans[i].fd >= 0)
			close(chans[i].fd);
		unlink(chans[i].path);
	}
	return 0;
}
