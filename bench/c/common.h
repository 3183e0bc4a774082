/*
 * common.h: the pieces the bench's C programs share (cagent, cagent_batch, loadgen,
 * qemustub): the guest-channel packet layout, die(), parse_long(), now_ns(),
 * cmp_u64(), connect_channel() and build_request().
 *
 * Each program defines _GNU_SOURCE (before any include) and PROG, its name, before it
 * includes this file: PROG prefixes every error message, so they read as before.
 *
 *   #define _GNU_SOURCE
 *   ...
 *   #define PROG "cagent"
 *   #include "common.h"
 *
 * Everything here is static inline: a program that does not use a function gets no
 * copy of it and no unused-function warning.
 */
#ifndef BENCH_C_COMMON_H
#define BENCH_C_COMMON_H

#ifndef PROG
#error "define PROG (the program's name, for error messages) before including common.h"
#endif

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the guest-channel protocol is little-endian x86-64; these programs use native integers"
#endif

/* struct rte_power_channel_packet on x86-64 (docs/protocol.md): byte offsets. */
#define PACKET_SIZE 464
#define OFF_RESOURCE_ID 0
#define OFF_UNIT 8
#define OFF_COMMAND 12
#define CMD_CPU_POWER 1
#define REPLY_ACK 1
#define REPLY_NACK 2
#define UNIT_SCALE_UP 1
#define UNIT_SCALE_DOWN 2

#define CONNECT_TRIES 100 /* 10 s: the socket is bound before the agent starts */

/* "PROG: message" on stderr, exit code 1. */
__attribute__((format(printf, 1, 2), noreturn)) static inline void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs(PROG ": ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(1);
}

/* text as a decimal integer in min-max, else a message and exit code 2 (bad argument). */
static inline long parse_long(const char *what, const char *text, long min, long max)
{
	char *end;
	errno = 0;
	long v = strtol(text, &end, 10);
	if (errno || *end || end == text || v < min || v > max) {
		fprintf(stderr, PROG ": %s must be an integer in %ld-%ld, got %s\n", what, min,
			max, text);
		exit(2);
	}
	return v;
}

static inline uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* qsort order of uint64_t (latencies). */
static inline int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* The agents' side: connect to a channel socket as the client, retrying while the
 * socket is not there yet or not listening (CONNECT_TRIES x 100 ms). */
static inline int connect_channel(const char *path)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof addr.sun_path)
		die("%s: socket path too long", path);
	strcpy(addr.sun_path, path);
	for (int attempt = 0;; attempt++) {
		int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0)
			die("socket: %s", strerror(errno));
		if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0)
			return fd;
		int err = errno;
		close(fd);
		if ((err != ENOENT && err != ECONNREFUSED) || attempt >= CONNECT_TRIES)
			die("connect %s: %s", path, strerror(err));
		struct timespec pause = {.tv_sec = 0, .tv_nsec = 100000000};
		nanosleep(&pause, NULL);
	}
}

/* The guests' side: a CPU_POWER request for vcpu into pkt, unit SCALE_UP then
 * SCALE_DOWN alternating as *next_unit counts; vm_name empty (identity comes from the
 * channel). */
static inline void build_request(unsigned char *pkt, uint64_t vcpu, unsigned *next_unit)
{
	uint32_t unit = ((*next_unit)++ & 1) ? UNIT_SCALE_DOWN : UNIT_SCALE_UP;
	uint32_t command = CMD_CPU_POWER;
	memset(pkt, 0, PACKET_SIZE);
	memcpy(pkt + OFF_RESOURCE_ID, &vcpu, sizeof vcpu);
	memcpy(pkt + OFF_UNIT, &unit, sizeof unit);
	memcpy(pkt + OFF_COMMAND, &command, sizeof command);
}

#endif /* BENCH_C_COMMON_H */
