// SPDX-License-Identifier: GPL-2.0
/*
 * sevplace rig test VMM: a tiny, static, multi-vCPU KVM guest runner.
 *
 * Each vCPU is a thread named "CPU N/KVM" (like QEMU's) that runs a real-mode
 * loop doing port I/O (one exit to user space per iteration) and re-enters.
 * Pinning, floating and memslot deletion are driven through a control FIFO,
 * one command per line; every command is acknowledged by appending a line
 * to the ack file, so the caller can wait for it to take effect.
 *
 *   vmm [-n VCPUS] [-p PINSPEC] [-c CTL_FIFO] [-a ACK_FILE] [-r READY_FILE]
 *       [-s SLEEP_US]
 *
 *   PINSPEC  per-vCPU cpulists separated by ':' ("1:2" = vCPU0 on CPU 1,
 *            vCPU1 on CPU 2; "3" = every vCPU on CPU 3; "1-2" = every vCPU
 *            on CPUs 1 and 2); the last list repeats for remaining vCPUs.
 *            Without -p the vCPUs float over every CPU.
 *   Commands on the FIFO:
 *     pin PINSPEC | float | delslot | addslot | cycleslot | stats | quit
 *   READY_FILE is created once every vCPU has entered the guest at least once.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_VCPUS 64
#define CODE_GPA 0x1000
#define MAIN_SIZE 0x10000
#define SLOT1_GPA 0x100000
#define SLOT1_SIZE 0x10000

struct vcpu {
	int idx;
	int fd;
	struct kvm_run *run;
	pthread_t thr;
	volatile pid_t tid;
	volatile unsigned long exits;
	volatile int last_cpu;
	cpu_set_t initial;
};

static int kvm_fd, vm_fd, nvcpus = 1, run_size;
static unsigned sleep_us = 1000;
static struct vcpu vcpus[MAX_VCPUS];
static void *slot1_mem;
static int slot1_present;
static volatile int stopping;
static const char *ack_path;

static void die(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fprintf(stderr, "vmm: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, ": %s\n", strerror(errno));
	va_end(ap);
	exit(1);
}

static int parse_cpulist(const char *s, cpu_set_t *set)
{
	char *end;

	CPU_ZERO(set);
	if (!*s)
		return -1;
	while (*s) {
		long a = strtol(s, &end, 10), b;

		if (end == s || a < 0 || a >= CPU_SETSIZE)
			return -1;
		b = a;
		s = end;
		if (*s == '-') {
			s++;
			b = strtol(s, &end, 10);
			if (end == s || b < a || b >= CPU_SETSIZE)
				return -1;
			s = end;
		}
		for (long i = a; i <= b; i++)
			CPU_SET(i, set);
		if (*s == ',')
			s++;
		else if (*s)
			return -1;
	}
	return 0;
}

/* Fill sets[0..nvcpus) from "L0:L1:..."; NULL spec = all CPUs. */
static int parse_pinspec(const char *spec, cpu_set_t *sets)
{
	char buf[1024], *save = NULL, *tok;
	int i = 0;

	if (!spec) {
		if (sched_getaffinity(0, sizeof(cpu_set_t), &sets[0]))
			return -1;
		for (i = 1; i < nvcpus; i++)
			sets[i] = sets[0];
		return 0;
	}
	snprintf(buf, sizeof(buf), "%s", spec);
	for (tok = strtok_r(buf, ":", &save); tok && i < nvcpus;
	     tok = strtok_r(NULL, ":", &save), i++)
		if (parse_cpulist(tok, &sets[i]))
			return -1;
	if (i == 0)
		return -1;
	for (; i < nvcpus; i++)
		sets[i] = sets[i - 1];
	return 0;
}

static cpu_set_t all_cpus;

static void *vcpu_thread(void *arg)
{
	struct vcpu *v = arg;
	char name[16];

	snprintf(name, sizeof(name), "CPU %d/KVM", v->idx);
	pthread_setname_np(pthread_self(), name);
	v->tid = (pid_t)syscall(SYS_gettid);
	/* pin before the first entry, so the first KVM_RUN is already placed */
	if (sched_setaffinity(0, sizeof(cpu_set_t), &v->initial))
		die("sched_setaffinity vcpu %d", v->idx);
	while (!stopping) {
		if (ioctl(v->fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("KVM_RUN vcpu %d", v->idx);
		}
		v->last_cpu = sched_getcpu();
		switch (v->run->exit_reason) {
		case KVM_EXIT_IO:
			break;
		default:
			fprintf(stderr, "vmm: vcpu %d unexpected exit %u\n",
				v->idx, v->run->exit_reason);
			exit(1);
		}
		__atomic_add_fetch(&v->exits, 1, __ATOMIC_RELAXED);
		if (sleep_us)
			usleep(sleep_us);
	}
	return NULL;
}

static int set_slot1(int present)
{
	struct kvm_userspace_memory_region r = {
		.slot = 1,
		.guest_phys_addr = SLOT1_GPA,
		.memory_size = present ? SLOT1_SIZE : 0,
		.userspace_addr = (uintptr_t)slot1_mem,
	};

	if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r))
		return -1;
	slot1_present = present;
	return 0;
}

static void ack(const char *fmt, ...)
{
	va_list ap;
	FILE *f;

	if (!ack_path)
		return;
	f = fopen(ack_path, "a");
	if (!f)
		die("open %s", ack_path);
	va_start(ap, fmt);
	vfprintf(f, fmt, ap);
	va_end(ap);
	fputc('\n', f);
	fclose(f);
}

static void apply_pins(cpu_set_t *sets)
{
	for (int i = 0; i < nvcpus; i++)
		if (sched_setaffinity(vcpus[i].tid, sizeof(cpu_set_t), &sets[i]))
			die("sched_setaffinity tid %d", vcpus[i].tid);
}

static void handle(char *line)
{
	static cpu_set_t sets[MAX_VCPUS];
	size_t n = strlen(line);

	while (n && (line[n - 1] == '\n' || line[n - 1] == '\r' || line[n - 1] == ' '))
		line[--n] = 0;
	if (!n)
		return;
	if (!strncmp(line, "pin ", 4)) {
		if (parse_pinspec(line + 4, sets)) {
			ack("ERR %s bad pinspec", line);
			return;
		}
		apply_pins(sets);
	} else if (!strcmp(line, "float")) {
		for (int i = 0; i < nvcpus; i++)
			sets[i] = all_cpus;
		apply_pins(sets);
	} else if (!strcmp(line, "delslot")) {
		if (set_slot1(0)) {
			ack("ERR %s %s", line, strerror(errno));
			return;
		}
	} else if (!strcmp(line, "addslot")) {
		if (set_slot1(1)) {
			ack("ERR %s %s", line, strerror(errno));
			return;
		}
	} else if (!strcmp(line, "cycleslot")) {
		if (set_slot1(0) || set_slot1(1)) {
			ack("ERR %s %s", line, strerror(errno));
			return;
		}
	} else if (!strcmp(line, "stats")) {
		char buf[4096];
		int o = 0;

		for (int i = 0; i < nvcpus && o < (int)sizeof(buf) - 64; i++)
			o += snprintf(buf + o, sizeof(buf) - o, " vcpu%d=%lu@%d",
				      i, vcpus[i].exits, vcpus[i].last_cpu);
		ack("OK stats%s", buf);
		return;
	} else if (!strcmp(line, "quit")) {
		ack("OK quit");
		exit(0);
	} else {
		ack("ERR %s unknown command", line);
		return;
	}
	ack("OK %s", line);
}

static void usage(void)
{
	fprintf(stderr, "usage: vmm [-n VCPUS] [-p PINSPEC] [-c CTL_FIFO] "
			"[-a ACK_FILE] [-r READY_FILE] [-s SLEEP_US]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	const char *pinspec = NULL, *ctl = NULL, *ready = NULL;
	static cpu_set_t sets[MAX_VCPUS];
	struct kvm_userspace_memory_region mr;
	uint8_t *mem;
	int opt;
	/* mov al,0x41; 1: out 0x10,al; inc al; jmp 1b */
	static const uint8_t code[] = { 0xb0, 0x41, 0xe6, 0x10, 0xfe, 0xc0, 0xeb, 0xfa };

	while ((opt = getopt(argc, argv, "n:p:c:a:r:s:h")) != -1) {
		switch (opt) {
		case 'n': nvcpus = atoi(optarg); break;
		case 'p': pinspec = optarg; break;
		case 'c': ctl = optarg; break;
		case 'a': ack_path = optarg; break;
		case 'r': ready = optarg; break;
		case 's': sleep_us = (unsigned)strtoul(optarg, NULL, 10); break;
		default: usage();
		}
	}
	if (nvcpus < 1 || nvcpus > MAX_VCPUS || optind != argc)
		usage();
	if (sched_getaffinity(0, sizeof(all_cpus), &all_cpus))
		die("sched_getaffinity");
	if (parse_pinspec(pinspec, sets)) {
		fprintf(stderr, "vmm: bad pinspec '%s'\n", pinspec);
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);

	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0)
		die("open /dev/kvm");
	if (ioctl(kvm_fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
		die("KVM API version");
	vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	if (vm_fd < 0)
		die("KVM_CREATE_VM");
	ioctl(vm_fd, KVM_SET_TSS_ADDR, 0xfffbd000UL); /* no-op on SVM */
	run_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size <= 0)
		die("KVM_GET_VCPU_MMAP_SIZE");

	mem = mmap(NULL, MAIN_SIZE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	memcpy(mem + CODE_GPA, code, sizeof(code));
	mr = (struct kvm_userspace_memory_region){
		.slot = 0, .guest_phys_addr = 0, .memory_size = MAIN_SIZE,
		.userspace_addr = (uintptr_t)mem,
	};
	if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &mr))
		die("KVM_SET_USER_MEMORY_REGION slot 0");
	slot1_mem = mmap(NULL, SLOT1_SIZE, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (slot1_mem == MAP_FAILED)
		die("mmap");
	memset(slot1_mem, 0x5a, SLOT1_SIZE);
	if (set_slot1(1))
		die("KVM_SET_USER_MEMORY_REGION slot 1");

	for (int i = 0; i < nvcpus; i++) {
		struct vcpu *v = &vcpus[i];
		struct kvm_sregs sregs;
		struct kvm_regs regs = { .rip = CODE_GPA, .rflags = 2 };

		v->idx = i;
		v->last_cpu = -1;
		v->initial = sets[i];
		v->fd = ioctl(vm_fd, KVM_CREATE_VCPU, i);
		if (v->fd < 0)
			die("KVM_CREATE_VCPU %d", i);
		v->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED,
			      v->fd, 0);
		if (v->run == MAP_FAILED)
			die("mmap kvm_run");
		if (ioctl(v->fd, KVM_GET_SREGS, &sregs))
			die("KVM_GET_SREGS");
		sregs.cs.base = 0;
		sregs.cs.selector = 0;
		if (ioctl(v->fd, KVM_SET_SREGS, &sregs))
			die("KVM_SET_SREGS");
		if (ioctl(v->fd, KVM_SET_REGS, &regs))
			die("KVM_SET_REGS");
	}
	for (int i = 0; i < nvcpus; i++)
		if (pthread_create(&vcpus[i].thr, NULL, vcpu_thread, &vcpus[i]))
			die("pthread_create");

	/* wait until every vCPU entered the guest once */
	for (int tries = 0;; tries++) {
		int ok = 1;

		for (int i = 0; i < nvcpus; i++)
			if (!vcpus[i].exits)
				ok = 0;
		if (ok)
			break;
		if (tries > 60000)
			die("vCPUs did not start");
		usleep(1000);
	}
	printf("vmm: pid %d running %d vCPUs\n", getpid(), nvcpus);
	if (ready) {
		int fd = open(ready, O_WRONLY | O_CREAT | O_TRUNC, 0644);

		if (fd < 0)
			die("open %s", ready);
		dprintf(fd, "%d\n", getpid());
		close(fd);
	}
	if (!ctl) {
		for (;;)
			pause();
	}
	{
		FILE *f;
		char line[1024];

		if (mkfifo(ctl, 0600) && errno != EEXIST)
			die("mkfifo %s", ctl);
		/* O_RDWR: never see EOF when a writer goes away */
		f = fopen(ctl, "r+");
		if (!f)
			die("open %s", ctl);
		while (fgets(line, sizeof(line), f))
			handle(line);
	}
	return 0;
}
