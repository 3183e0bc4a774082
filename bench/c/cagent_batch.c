/*
 * cagent_batch: the throughput limit the host agent benchmark compares vmpowerd with.
 *
 * cagent.c does DPDK's work one packet at a time; this agent does the same work with
 * every batching a correct agent may use, so that its request rate is the ceiling for
 * the load generator on this machine. Per epoll wake:
 *
 *   1. for each readable channel, ONE recv of up to --max-batch x 464 bytes (the whole
 *      packets waiting; a partial packet's bytes are kept for the next wake);
 *   2. each whole packet is decoded: SCALE_UP targets --high-khz, SCALE_DOWN --low-khz
 *      on the channel's CPU; any other unit or command gets a NACK;
 *   3. ONE pwrite per CPU touched in this turn, of the last target asked for it (the
 *      earlier ones would be overwritten at once: the file ends the same);
 *   4. ONE send per channel carrying all of its replies (ACK when its CPU's write
 *      succeeded).
 *
 * Like cagent.c: connects to each channel socket as the client (QEMU, here
 * bench/c/loadgen, binds it), no ownership checks, runs until killed (SIGTERM), drops
 * a channel its peer closes.
 *
 * With --write-each, step 3 is DPDK's instead: one pwrite per request, as it comes (the
 * reads and the replies still batched). That is "a C agent that batches reads and
 * replies" in issue #16's words; without it, the agent also coalesces its writes as
 * vmpowerd does (one per CPU per turn), the tighter limit.
 *
 * Usage: cagent_batch [--max-batch N] [--write-each] --sysfs-root ROOT --high-khz F
 *                     --low-khz F PATH:CPU...
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define PROG "cagent_batch"
#include "common.h"

#define MAX_CPUS 1024
#define MAX_EVENTS 256

struct channel {
	const char *path;
	int cpu;
	int fd;
	unsigned char *rx; /* max_batch packets; rx_len bytes of a partial packet carried over */
	size_t rx_len;
	unsigned char *tx; /* this turn's replies */
	size_t tx_len;
	int valid; /* this turn's CPU_POWER SCALE_UP/DOWN packets: their code waits for the write */
};

static int setspeed_fd[MAX_CPUS];
static const char *target_text[MAX_CPUS]; /* this turn's last target per CPU, NULL: none */
static int target_len[MAX_CPUS];
static int write_ok[MAX_CPUS];
static int touched[MAX_CPUS]; /* CPUs with a target this turn, in first-seen order */

/* All of buf, in one send when the socket has room (it has: the peer keeps a window of
 * at most --max-batch requests); waits for room otherwise. */
static int send_all(int fd, const unsigned char *buf, size_t len)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = send(fd, buf + done, len - done, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN) {
			struct pollfd pfd = {.fd = fd, .events = POLLOUT};
			if (poll(&pfd, 1, -1) < 0 && errno != EINTR)
				return -1;
			continue;
		}
		if (n < 0)
			return -1;
		done += (size_t)n;
	}
	return 0;
}

static void drop(int ep, struct channel *ch)
{
	epoll_ctl(ep, EPOLL_CTL_DEL, ch->fd, NULL);
	close(ch->fd);
	ch->fd = -1;
}

static void usage(void)
{
	fputs("usage: cagent_batch [--max-batch N] [--write-each] --sysfs-root ROOT --high-khz F --low-khz F "
	      "PATH:CPU...\n",
	      stderr);
	exit(2);
}

int main(int argc, char **argv)
{
	const char *root = NULL;
	long high_khz = 0, low_khz = 0, max_batch = 64;
	int first = 1, write_each = 0;
	while (first + 1 < argc && strncmp(argv[first], "--", 2) == 0) {
		const char *opt = argv[first], *val = argv[first + 1];
		if (strcmp(opt, "--write-each") == 0) {
			write_each = 1;
			first += 1;
			continue;
		}
		if (strcmp(opt, "--sysfs-root") == 0)
			root = val;
		else if (strcmp(opt, "--high-khz") == 0)
			high_khz = parse_long(opt, val, 1, 100000000);
		else if (strcmp(opt, "--low-khz") == 0)
			low_khz = parse_long(opt, val, 1, 100000000);
		else if (strcmp(opt, "--max-batch") == 0)
			max_batch = parse_long(opt, val, 1, 4096);
		else
			usage();
		first += 2;
	}
	int n = argc - first;
	if (root == NULL || high_khz == 0 || low_khz == 0 || n < 1)
		usage();
	char high_text[24], low_text[24];
	int high_len = snprintf(high_text, sizeof high_text, "%ld", high_khz);
	int low_len = snprintf(low_text, sizeof low_text, "%ld", low_khz);
	size_t batch_bytes = (size_t)max_batch * PACKET_SIZE;

	for (int i = 0; i < MAX_CPUS; i++)
		setspeed_fd[i] = -1;
	struct channel *chans = calloc((size_t)n, sizeof *chans);
	struct channel **turn = calloc((size_t)n, sizeof *turn); /* channels read this turn */
	if (chans == NULL || turn == NULL)
		die("out of memory");
	int ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		die("epoll_create1: %s", strerror(errno));
	for (int i = 0; i < n; i++) {
		char *spec = argv[first + i];
		char *colon = strrchr(spec, ':');
		if (colon == NULL || colon == spec)
			die("channel %s: expected PATH:CPU", spec);
		*colon = '\0';
		struct channel *ch = &chans[i];
		ch->path = spec;
		ch->cpu = (int)parse_long("CPU", colon + 1, 0, MAX_CPUS - 1);
		ch->rx = malloc(batch_bytes);
		ch->tx = malloc(batch_bytes);
		if (ch->rx == NULL || ch->tx == NULL)
			die("out of memory");
		if (setspeed_fd[ch->cpu] < 0) {
			char file[4096];
			snprintf(file, sizeof file,
				 "%s/devices/system/cpu/cpu%d/cpufreq/scaling_setspeed", root, ch->cpu);
			setspeed_fd[ch->cpu] = open(file, O_WRONLY | O_CLOEXEC);
			if (setspeed_fd[ch->cpu] < 0)
				die("open %s: %s", file, strerror(errno));
		}
		ch->fd = connect_channel(ch->path);
		struct epoll_event ev = {.events = EPOLLIN, .data.ptr = ch};
		if (epoll_ctl(ep, EPOLL_CTL_ADD, ch->fd, &ev) < 0)
			die("epoll_ctl: %s", strerror(errno));
	}

	struct epoll_event evs[MAX_EVENTS];
	for (;;) {
		int ready = epoll_wait(ep, evs, MAX_EVENTS, -1);
		if (ready < 0 && errno == EINTR)
			continue;
		if (ready < 0)
			die("epoll_wait: %s", strerror(errno));
		int n_turn = 0, n_touched = 0;

		/* 1-2: read and decode every readable channel's whole packets. */
		for (int e = 0; e < ready; e++) {
			struct channel *ch = evs[e].data.ptr;
			ssize_t got = recv(ch->fd, ch->rx + ch->rx_len, batch_bytes - ch->rx_len,
					   MSG_DONTWAIT);
			if (got < 0 && (errno == EAGAIN || errno == EINTR))
				continue;
			if (got <= 0) {
				drop(ep, ch);
				continue;
			}
			ch->rx_len += (size_t)got;
			size_t whole = ch->rx_len / PACKET_SIZE;
			if (whole == 0)
				continue;
			size_t used = whole * PACKET_SIZE;
			memcpy(ch->tx, ch->rx, used); /* the replies are the requests, recoded */
			ch->tx_len = used;
			memmove(ch->rx, ch->rx + used, ch->rx_len - used);
			ch->rx_len -= used;
			ch->valid = 0;
			for (size_t k = 0; k < whole; k++) {
				unsigned char *pkt = ch->tx + k * PACKET_SIZE;
				uint32_t command, unit, code = REPLY_NACK;
				memcpy(&command, pkt + OFF_COMMAND, sizeof command);
				memcpy(&unit, pkt + OFF_UNIT, sizeof unit);
				if (write_each && command == CMD_CPU_POWER &&
				    (unit == UNIT_SCALE_UP || unit == UNIT_SCALE_DOWN)) {
					int up = unit == UNIT_SCALE_UP;
					int len = up ? high_len : low_len;
					ssize_t put = pwrite(setspeed_fd[ch->cpu], up ? high_text : low_text,
							     (size_t)len, 0);
					code = put == len ? REPLY_ACK : REPLY_NACK;
				} else if (command == CMD_CPU_POWER &&
				    (unit == UNIT_SCALE_UP || unit == UNIT_SCALE_DOWN)) {
					if (target_text[ch->cpu] == NULL)
						touched[n_touched++] = ch->cpu;
					int up = unit == UNIT_SCALE_UP;
					target_text[ch->cpu] = up ? high_text : low_text;
					target_len[ch->cpu] = up ? high_len : low_len;
					code = REPLY_ACK; /* NACK instead if the CPU's write fails */
					ch->valid++;
				}
				memcpy(pkt + OFF_COMMAND, &code, sizeof code);
			}
			turn[n_turn++] = ch;
		}

		/* 3: one write per CPU, its last target. */
		for (int t = 0; t < n_touched; t++) {
			int cpu = touched[t];
			write_ok[cpu] = pwrite(setspeed_fd[cpu], target_text[cpu],
					       (size_t)target_len[cpu], 0) == target_len[cpu];
		}

		/* 4: one send per channel with all of its replies. */
		for (int c = 0; c < n_turn; c++) {
			struct channel *ch = turn[c];
			if (ch->valid && !write_ok[ch->cpu]) {
				uint32_t nack = REPLY_NACK;
				for (size_t off = 0; off < ch->tx_len; off += PACKET_SIZE)
					memcpy(ch->tx + off + OFF_COMMAND, &nack, sizeof nack);
			}
			if (send_all(ch->fd, ch->tx, ch->tx_len) < 0)
				drop(ep, ch);
			ch->tx_len = 0;
		}
		for (int t = 0; t < n_touched; t++)
			target_text[touched[t]] = NULL;
	}
}
