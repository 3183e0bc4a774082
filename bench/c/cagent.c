/*
 * cagent: the reference the host agent benchmark compares vmpowerd with.
 *
 * It does the per-request work of DPDK's vm_power_manager (channel_monitor.c), one
 * packet at a time and nothing more: connect to each channel socket as the client
 * (like vmpowerd; QEMU, here bench/c/loadgen, binds it), wait in epoll, and for each
 * readable channel read one whole 464-byte packet, make one sysfs write (pwrite of
 * the target kHz into the CPU's scaling_setspeed, kept open as DPDK keeps its FILE),
 * and write the 464-byte reply with command ACK. No batching, no coalescing, no
 * ownership checks: a lower bound on the work a correct agent has to do.
 *
 * SCALE_UP writes --high-khz, SCALE_DOWN --low-khz (two adjacent table entries: DPDK's
 * one-step move); any other unit or command gets a NACK, still with one reply.
 *
 * Usage: cagent --sysfs-root ROOT --high-khz F --low-khz F PATH:CPU...
 * It runs until killed (SIGTERM); a channel the peer closes is dropped.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define PROG "cagent"
#include "common.h"

#define MAX_CPUS 1024

struct channel {
	const char *path;
	int cpu;
	int fd;
};

static int setspeed_fd[MAX_CPUS];

/* Blocking, like DPDK's read_binary_packet: the rest of a packet is waited for. */
static int read_packet(int fd, unsigned char *buf)
{
	size_t have = 0;
	while (have < PACKET_SIZE) {
		ssize_t n = read(fd, buf + have, PACKET_SIZE - have);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		have += (size_t)n;
	}
	return 0;
}

static int write_packet(int fd, const unsigned char *buf)
{
	size_t done = 0;
	while (done < PACKET_SIZE) {
		ssize_t n = send(fd, buf + done, PACKET_SIZE - done, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -1;
		done += (size_t)n;
	}
	return 0;
}

static void usage(void)
{
	fputs("usage: cagent --sysfs-root ROOT --high-khz F --low-khz F PATH:CPU...\n", stderr);
	exit(2);
}

int main(int argc, char **argv)
{
	const char *root = NULL;
	long high_khz = 0, low_khz = 0;
	int first = 1;
	while (first + 1 < argc && strncmp(argv[first], "--", 2) == 0) {
		const char *opt = argv[first], *val = argv[first + 1];
		if (strcmp(opt, "--sysfs-root") == 0)
			root = val;
		else if (strcmp(opt, "--high-khz") == 0)
			high_khz = parse_long(opt, val, 1, 100000000);
		else if (strcmp(opt, "--low-khz") == 0)
			low_khz = parse_long(opt, val, 1, 100000000);
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

	for (int i = 0; i < MAX_CPUS; i++)
		setspeed_fd[i] = -1;
	struct channel *chans = calloc((size_t)n, sizeof *chans);
	if (chans == NULL)
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
		chans[i].path = spec;
		chans[i].cpu = (int)parse_long("CPU", colon + 1, 0, MAX_CPUS - 1);
		int cpu = chans[i].cpu;
		if (setspeed_fd[cpu] < 0) {
			char file[4096];
			snprintf(file, sizeof file,
				 "%s/devices/system/cpu/cpu%d/cpufreq/scaling_setspeed", root, cpu);
			setspeed_fd[cpu] = open(file, O_WRONLY | O_CLOEXEC);
			if (setspeed_fd[cpu] < 0)
				die("open %s: %s", file, strerror(errno));
		}
		chans[i].fd = connect_channel(chans[i].path);
		struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &chans[i]};
		if (epoll_ctl(ep, EPOLL_CTL_ADD, chans[i].fd, &ev) < 0)
			die("epoll_ctl: %s", strerror(errno));
	}

	unsigned char pkt[PACKET_SIZE];
	struct epoll_event evs[64];
	for (;;) {
		int ready = epoll_wait(ep, evs, 64, -1);
		if (ready < 0 && errno == EINTR)
			continue;
		if (ready < 0)
			die("epoll_wait: %s", strerror(errno));
		for (int e = 0; e < ready; e++) {
			struct channel *ch = evs[e].data.ptr;
			if (read_packet(ch->fd, pkt) < 0) {
				epoll_ctl(ep, EPOLL_CTL_DEL, ch->fd, NULL);
				close(ch->fd);
				continue;
			}
			uint32_t command, unit, code = REPLY_NACK;
			memcpy(&command, pkt + OFF_COMMAND, sizeof command);
			memcpy(&unit, pkt + OFF_UNIT, sizeof unit);
			if (command == CMD_CPU_POWER &&
			    (unit == UNIT_SCALE_UP || unit == UNIT_SCALE_DOWN)) {
				const char *text = unit == UNIT_SCALE_UP ? high_text : low_text;
				int len = unit == UNIT_SCALE_UP ? high_len : low_len;
				if (pwrite(setspeed_fd[ch->cpu], text, (size_t)len, 0) == len)
					code = REPLY_ACK;
			}
			memcpy(pkt + OFF_COMMAND, &code, sizeof code);
			if (write_packet(ch->fd, pkt) < 0) {
				epoll_ctl(ep, EPOLL_CTL_DEL, ch->fd, NULL);
				close(ch->fd);
			}
		}
	}
}
