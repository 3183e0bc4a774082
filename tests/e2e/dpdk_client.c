/*
 * vmpower e2e: a guest application written against DPDK's public power API only.
 *
 * It proves that an unmodified DPDK guest (librte_power's KVM-VM driver, Debian's
 * librte-power23) works against vmpowerd: the library opens
 * /dev/virtio-ports/virtio.serial.port.poweragent.<lcore> itself, sends its
 * CPU_POWER_CONNECT, and each rte_power_freq_*() call sends one 464-byte CPU_POWER
 * request. The library never reads the host's ACK/NACK (power_kvm_vm.c returns 1 as soon
 * as the request is written), so this client reads it with
 * rte_power_guest_channel_receive_msg(), as DPDK's guest_cli sample does for queries.
 *
 * Usage: vmpower_dpdk_client [-t TIMEOUT_MS] LCORE STEP...
 *   STEP: up down max min enable_turbo disable_turbo
 *         query_freq_list query_freq query_caps_list query_caps
 *         rtt:N   (N x SCALE_MAX + ACK, prints min/median/max round trip in microseconds)
 * One output line per step, "key=value" words, e.g.
 *   step=max reply=ACK
 *   step=query_freq_list reply=FREQ_LIST num_vcpu=2 freqs_khz=2400000,1800000
 * Exit status: 0 when every step got a reply (ACK or NACK), 1 otherwise, 2 on bad usage.
 *
 * Build: gcc -DALLOW_EXPERIMENTAL_API (rte_power_guest_channel_receive_msg is
 * __rte_experimental in DPDK 22.11) against libdpdk-dev's headers, linked with
 * librte_power.so.23. rte_eal_init() is not needed for the KVM-VM driver.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <rte_power.h>
#include <rte_power_guest_channel.h>

static long timeout_ms = 10000;

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/*
 * The library's read polls for only 10 ms (TIMEOUT in guest_channel.c) and returns -1 on
 * timeout; a TCG guest and a busy host need far longer, so retry until our own deadline.
 */
static int receive(void *buf, size_t len, unsigned int lcore)
{
	double deadline = now_s() + (double)timeout_ms / 1000.0;

	memset(buf, 0, len);
	while (now_s() < deadline) {
		if (rte_power_guest_channel_receive_msg(buf, len, lcore) == 0)
			return 0;
	}
	return -1;
}

static const char *reply_name(uint32_t command)
{
	switch (command) {
	case RTE_POWER_CMD_ACK:
		return "ACK";
	case RTE_POWER_CMD_NACK:
		return "NACK";
	case RTE_POWER_FREQ_LIST:
		return "FREQ_LIST";
	case RTE_POWER_CAPS_LIST:
		return "CAPS_LIST";
	default:
		return "UNKNOWN";
	}
}

/* One CPU_POWER step through the library's own entry point, then its ACK/NACK. */
static int power_step(const char *name, rte_power_freq_change_t fn, unsigned int lcore)
{
	struct rte_power_channel_packet reply;
	int sent = fn(lcore);

	if (sent != 1) {
		printf("step=%s error=send_failed ret=%d\n", name, sent);
		return -1;
	}
	if (receive(&reply, sizeof(reply), lcore) != 0) {
		printf("step=%s error=no_reply\n", name);
		return -1;
	}
	printf("step=%s reply=%s resource_id=%llu unit=%u\n", name, reply_name(reply.command),
	       (unsigned long long)reply.resource_id, reply.unit);
	return 0;
}

static int query_step(const char *name, uint32_t command, unsigned int lcore)
{
	struct rte_power_channel_packet pkt;
	int ret;

	memset(&pkt, 0, sizeof(pkt));
	pkt.command = command;
	pkt.resource_id = lcore;
	ret = rte_power_guest_channel_send_msg(&pkt, lcore);
	if (ret != 0) {
		printf("step=%s error=send_failed ret=%d\n", name, ret);
		return -1;
	}
	if (command == RTE_POWER_QUERY_FREQ_LIST || command == RTE_POWER_QUERY_FREQ) {
		struct rte_power_channel_packet_freq_list reply;

		if (receive(&reply, sizeof(reply), lcore) != 0) {
			printf("step=%s error=no_reply\n", name);
			return -1;
		}
		printf("step=%s reply=%s num_vcpu=%u freqs_khz=", name, reply_name(reply.command),
		       reply.num_vcpu);
		for (unsigned int i = 0; i < reply.num_vcpu && i < RTE_POWER_MAX_VCPU_PER_VM; i++)
			printf("%s%u", i ? "," : "", reply.freq_list[i]);
		printf("\n");
	} else {
		struct rte_power_channel_packet_caps_list reply;

		if (receive(&reply, sizeof(reply), lcore) != 0) {
			printf("step=%s error=no_reply\n", name);
			return -1;
		}
		printf("step=%s reply=%s num_vcpu=%u turbo=", name, reply_name(reply.command),
		       reply.num_vcpu);
		for (unsigned int i = 0; i < reply.num_vcpu && i < RTE_POWER_MAX_VCPU_PER_VM; i++)
			printf("%s%llu", i ? "," : "", (unsigned long long)reply.turbo[i]);
		printf(" priority=");
		for (unsigned int i = 0; i < reply.num_vcpu && i < RTE_POWER_MAX_VCPU_PER_VM; i++)
			printf("%s%llu", i ? "," : "", (unsigned long long)reply.priority[i]);
		printf("\n");
	}
	return 0;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

/* N round trips of SCALE_MAX (idempotent, so repeating it changes nothing). */
static int rtt_step(const char *name, long count, unsigned int lcore)
{
	struct rte_power_channel_packet reply;
	double *samples_us;
	long acks = 0;

	if (count < 1 || count > 100000) {
		printf("step=%s error=bad_count\n", name);
		return -1;
	}
	samples_us = calloc((size_t)count, sizeof(double));
	if (samples_us == NULL)
		return -1;
	for (long i = 0; i < count; i++) {
		double start = now_s();

		if (rte_power_freq_max(lcore) != 1 || receive(&reply, sizeof(reply), lcore) != 0) {
			printf("step=%s error=no_reply at=%ld\n", name, i);
			free(samples_us);
			return -1;
		}
		samples_us[i] = (now_s() - start) * 1e6;
		acks += reply.command == RTE_POWER_CMD_ACK;
	}
	qsort(samples_us, (size_t)count, sizeof(double), cmp_double);
	printf("step=%s count=%ld acks=%ld min_us=%.0f median_us=%.0f max_us=%.0f\n", name, count,
	       acks, samples_us[0], samples_us[count / 2], samples_us[count - 1]);
	free(samples_us);
	return 0;
}

static int run_step(const char *step, unsigned int lcore)
{
	if (strcmp(step, "up") == 0)
		return power_step(step, rte_power_freq_up, lcore);
	if (strcmp(step, "down") == 0)
		return power_step(step, rte_power_freq_down, lcore);
	if (strcmp(step, "max") == 0)
		return power_step(step, rte_power_freq_max, lcore);
	if (strcmp(step, "min") == 0)
		return power_step(step, rte_power_freq_min, lcore);
	if (strcmp(step, "enable_turbo") == 0)
		return power_step(step, rte_power_freq_enable_turbo, lcore);
	if (strcmp(step, "disable_turbo") == 0)
		return power_step(step, rte_power_freq_disable_turbo, lcore);
	if (strcmp(step, "query_freq_list") == 0)
		return query_step(step, RTE_POWER_QUERY_FREQ_LIST, lcore);
	if (strcmp(step, "query_freq") == 0)
		return query_step(step, RTE_POWER_QUERY_FREQ, lcore);
	if (strcmp(step, "query_caps_list") == 0)
		return query_step(step, RTE_POWER_QUERY_CAPS_LIST, lcore);
	if (strcmp(step, "query_caps") == 0)
		return query_step(step, RTE_POWER_QUERY_CAPS, lcore);
	if (strncmp(step, "rtt:", 4) == 0)
		return rtt_step(step, strtol(step + 4, NULL, 10), lcore);
	printf("step=%s error=unknown_step\n", step);
	return -1;
}

int main(int argc, char **argv)
{
	unsigned int lcore;
	char *end;
	int first = 1, failed = 0;

	if (argc > 2 && strcmp(argv[1], "-t") == 0) {
		timeout_ms = strtol(argv[2], NULL, 10);
		first = 3;
	}
	if (argc - first < 2) {
		fprintf(stderr, "usage: %s [-t TIMEOUT_MS] LCORE STEP...\n", argv[0]);
		return 2;
	}
	errno = 0;
	lcore = (unsigned int)strtoul(argv[first], &end, 10);
	if (errno != 0 || *end != '\0') {
		fprintf(stderr, "%s: bad lcore %s\n", argv[0], argv[first]);
		return 2;
	}
	/* Unbuffered: a step's line is visible even if a later step hangs or crashes. */
	setvbuf(stdout, NULL, _IONBF, 0);
	if (rte_power_set_env(PM_ENV_KVM_VM) != 0) {
		printf("step=init error=set_env_failed\n");
		return 1;
	}
	/* Opens the lcore's virtio-serial port and sends CPU_POWER_CONNECT (no reply). */
	if (rte_power_init(lcore) != 0) {
		printf("step=init error=init_failed lcore=%u\n", lcore);
		return 1;
	}
	printf("step=init lcore=%u ok\n", lcore);
	for (int i = first + 1; i < argc; i++)
		failed |= run_step(argv[i], lcore) != 0;
	rte_power_exit(lcore);
	return failed ? 1 : 0;
}
