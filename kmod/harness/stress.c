// SPDX-License-Identifier: GPL-2.0
/*
 * Multithreaded stress test of the sevflush core in user space.
 *
 * SIM_NR_CPUS threads are simulated CPUs: each loops taking pending IPIs
 * ("IRQs on"), then picking a free vCPU of a runnable VM (so vCPUs migrate
 * between CPUs), running the entry probe sf_enter() and "running the guest"
 * (IRQs off: no IPI is taken until the next loop). Flusher threads reclaim
 * memory of random VMs (targeted flushes) and scrub them, concurrently. A
 * lifecycle thread destroys and re-creates one VM at the same key, with and
 * without a final flush, which exercises record removal and the generation.
 * A hotplug thread takes floating CPUs offline (flush IPIs skip them) and
 * back online (sf_cpu_reset()). VM 2 runs before the probe is live
 * (unknown past).
 *
 * Safety check, on every reclaim: every CPU that entered the VM before the
 * reclaim point and was not flushed since is flushed before sf_flush_vm()
 * returns. entries[cpu][vm] counts entries; a CPU's cache write-back records
 * flushed[cpu][vm] = entries[cpu][vm] for every VM. The reclaim point reads
 * need[cpu] = entries[cpu][vm]; after the flush, flushed[cpu][vm] >=
 * need[cpu] must hold for every CPU with entries of this VM incarnation.
 *
 * Exit status: 0 when no violation was found, 1 otherwise.
 */
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../sevflush_core.h"

#define NVM		3
#define NVCPU		2
#define NRECLAIM	2
#define NSCRUB		1
#define MAXVIOL		5

pthread_rwlock_t sim_rcu = PTHREAD_RWLOCK_INITIALIZER;
__thread int sim_cpu = -1;
static __thread uint64_t rng;

static char vm_keys[NVM];
static int vm_runnable[NVM];		/* atomic */
static int vcpu_busy[NVM][NVCPU];	/* atomic */
static pthread_rwlock_t vm_alive[NVM];
static unsigned long entries[SIM_NR_CPUS][NVM];	/* owner writes */
static unsigned long flushed[SIM_NR_CPUS][NVM];	/* owner writes */
static unsigned long base[SIM_NR_CPUS][NVM];	/* entries of dead incarnations */
static int probe_live;
static int stop_flushers, stop_cpus;
static long reclaims, violations, slow_entries_hint, lifecycles;
static long ids;

struct sim_call {
	smp_call_func_t func;
	void *info;
	int pending;
};

#define QLEN 64
static struct {
	pthread_mutex_t lock;
	struct sim_call *q[QLEN];
	int n;
} ipiq[SIM_NR_CPUS];

static uint64_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static void seed_rng(uint64_t s)
{
	rng = s * 0x9E3779B97F4A7C15ULL + 1;
	if (!rng)
		rng = 1;
}

void sim_test_window(void)
{
	uint64_t r = rnd() % 8;

	if (r == 0)
		usleep(20);
	else if (r < 3)
		sched_yield();
}

/* Environment callbacks of the core. */
struct sf_vm *sf_env_vm_alloc(const void *kvm)
{
	struct sf_vm *vm = calloc(1, sizeof(*vm));

	if (!vm)
		return NULL;
	sf_vm_init(vm, kvm);
	vm->id = __atomic_add_fetch(&ids, 1, __ATOMIC_RELAXED);
	vm->pid = getpid();
	return vm;
}

void sf_env_vm_free(struct sf_vm *vm)
{
	pthread_mutex_destroy(&vm->flush_lock.m);
	free(vm);
}

void sf_env_vm_published(struct sf_vm *vm)
{
	(void)vm;
}

static void sim_flush_here(void)
{
	int v;

	for (v = 0; v < NVM; v++)
		__atomic_store_n(&flushed[sim_cpu][v],
				 __atomic_load_n(&entries[sim_cpu][v],
						 __ATOMIC_RELAXED),
				 __ATOMIC_RELEASE);
}

void sf_env_wbinvd(void)
{
	sim_flush_here();
}

void sf_env_wbnoinvd(void)
{
	sim_flush_here();
}

/* IPIs */
/* CPU hotplug: the hotplug thread asks, the CPU thread obeys. */
static int want_offline[SIM_NR_CPUS];	/* atomic */
static int online_ready[SIM_NR_CPUS];	/* atomic */
static int is_offline[SIM_NR_CPUS];	/* under ipiq[cpu].lock */
static long hotplugs;

/* Queue an IPI; false if the CPU is offline (the kernel skips those). */
static bool post(int cpu, struct sim_call *c)
{
	for (;;) {
		pthread_mutex_lock(&ipiq[cpu].lock);
		if (is_offline[cpu]) {
			pthread_mutex_unlock(&ipiq[cpu].lock);
			return false;
		}
		if (ipiq[cpu].n < QLEN) {
			ipiq[cpu].q[ipiq[cpu].n++] = c;
			pthread_mutex_unlock(&ipiq[cpu].lock);
			return true;
		}
		pthread_mutex_unlock(&ipiq[cpu].lock);
		sched_yield();
	}
}

void on_each_cpu_mask(const struct cpumask *mask, smp_call_func_t func,
		      void *info, bool wait)
{
	struct sim_call c = { func, info, 0 };
	bool to[SIM_NR_CPUS];
	int cpu;

	(void)wait;
	for (cpu = 0; cpu < SIM_NR_CPUS; cpu++) {
		to[cpu] = cpumask_test_cpu(cpu, mask);
		c.pending += to[cpu];
	}
	for (cpu = 0; cpu < SIM_NR_CPUS; cpu++)
		if (to[cpu] && !post(cpu, &c))
			__atomic_fetch_sub(&c.pending, 1, __ATOMIC_RELEASE);
	while (__atomic_load_n(&c.pending, __ATOMIC_ACQUIRE))
		sched_yield();
}

void on_each_cpu(smp_call_func_t func, void *info, int wait)
{
	struct cpumask all;
	int cpu;

	cpumask_clear(&all);
	for (cpu = 0; cpu < SIM_NR_CPUS; cpu++)
		cpumask_set_cpu(cpu, &all);
	on_each_cpu_mask(&all, func, info, wait);
}

static void service_ipis(void)
{
	struct sim_call *batch[QLEN];
	int i, n;

	pthread_mutex_lock(&ipiq[sim_cpu].lock);
	n = ipiq[sim_cpu].n;
	memcpy(batch, ipiq[sim_cpu].q, n * sizeof(batch[0]));
	ipiq[sim_cpu].n = 0;
	pthread_mutex_unlock(&ipiq[sim_cpu].lock);
	for (i = 0; i < n; i++) {
		batch[i]->func(batch[i]->info);
		__atomic_fetch_sub(&batch[i]->pending, 1, __ATOMIC_RELEASE);
	}
}

/*
 * Take this CPU offline: run pending IPIs, write back caches (play_dead()
 * does WBINVD), leave the online mask; then wait to be brought back, after
 * the online callback reset this CPU's cache.
 */
static void go_offline(void)
{
	struct sim_call *batch[QLEN];
	int i, n;

	pthread_mutex_lock(&ipiq[sim_cpu].lock);
	n = ipiq[sim_cpu].n;
	memcpy(batch, ipiq[sim_cpu].q, n * sizeof(batch[0]));
	ipiq[sim_cpu].n = 0;
	for (i = 0; i < n; i++) {
		batch[i]->func(batch[i]->info);
		__atomic_fetch_sub(&batch[i]->pending, 1, __ATOMIC_RELEASE);
	}
	sim_flush_here();
	is_offline[sim_cpu] = 1;
	pthread_mutex_unlock(&ipiq[sim_cpu].lock);

	while (!__atomic_load_n(&online_ready[sim_cpu], __ATOMIC_ACQUIRE))
		usleep(50);
	__atomic_store_n(&online_ready[sim_cpu], 0, __ATOMIC_RELAXED);
	pthread_mutex_lock(&ipiq[sim_cpu].lock);
	is_offline[sim_cpu] = 0;
	pthread_mutex_unlock(&ipiq[sim_cpu].lock);
}

static void *cpu_thread(void *arg)
{
	long cpu = (long)arg;
	volatile int spin;

	sim_cpu = (int)cpu;
	seed_rng(1000 + cpu);
	while (!__atomic_load_n(&stop_cpus, __ATOMIC_ACQUIRE)) {
		int v, k, zero = 0, n;
		unsigned long e;

		service_ipis();			/* IRQs on */
		if (__atomic_load_n(&want_offline[cpu], __ATOMIC_ACQUIRE)) {
			go_offline();
			continue;
		}
		/*
		 * CPU 0 is pinned to vCPU 0 of VM 1 (destroyed and re-created),
		 * CPU 1 to vCPU 0 of VM 0 (often hot-unplugged); the others
		 * float over every vCPU.
		 */
		v = cpu == 0 ? 1 : cpu == 1 ? 0 : (int)(rnd() % NVM);
		k = cpu < 2 ? 0 : (int)(rnd() % NVCPU);
		if (!__atomic_load_n(&vm_runnable[v], __ATOMIC_ACQUIRE))
			continue;
		if (!__atomic_compare_exchange_n(&vcpu_busy[v][k], &zero, 1,
						 false, __ATOMIC_ACQUIRE,
						 __ATOMIC_RELAXED))
			continue;
		/* IRQs off from here: probe, then the guest runs. */
		if (__atomic_load_n(&probe_live, __ATOMIC_ACQUIRE))
			sf_enter(&vm_keys[v]);
		e = __atomic_load_n(&entries[cpu][v], __ATOMIC_RELAXED);
		__atomic_store_n(&entries[cpu][v], e + 1, __ATOMIC_RELEASE);
		n = rnd() % 64;
		for (spin = 0; spin < n; spin++)
			;
		__atomic_store_n(&vcpu_busy[v][k], 0, __ATOMIC_RELEASE);
		if (rnd() % 16 == 0)
			sched_yield();
	}
	service_ipis();
	return NULL;
}

/* Flush VM @v as a reclaim of its memory would, and check the property. */
static void reclaim(int v, enum sf_why why, const char *who)
{
	unsigned long need[SIM_NR_CPUS];
	struct sf_vm *vm;
	int cpu;

	for (cpu = 0; cpu < SIM_NR_CPUS; cpu++)
		need[cpu] = __atomic_load_n(&entries[cpu][v], __ATOMIC_ACQUIRE);

	rcu_read_lock();
	vm = sf_vm_lookup(&vm_keys[v]);
	if (vm)
		sf_flush_vm(vm, why);
	else
		sf_flush_all();
	rcu_read_unlock();

	__atomic_fetch_add(&reclaims, 1, __ATOMIC_RELAXED);
	for (cpu = 0; cpu < SIM_NR_CPUS; cpu++) {
		unsigned long f = __atomic_load_n(&flushed[cpu][v],
						  __ATOMIC_ACQUIRE);
		unsigned long b = __atomic_load_n(&base[cpu][v],
						  __ATOMIC_ACQUIRE);

		if (need[cpu] > b && f < need[cpu]) {
			long nv = __atomic_add_fetch(&violations, 1,
						     __ATOMIC_RELAXED);
			if (nv <= MAXVIOL)
				fprintf(stderr,
					"VIOLATION: %s of vm %d: cpu %d entered %lu times before the reclaim point, flushed only up to %lu\n",
					who, v, cpu, need[cpu], f);
		}
	}
}

static void *flusher_thread(void *arg)
{
	long id = (long)arg;
	bool scrub = id >= NRECLAIM;

	seed_rng(77 + id);
	while (!__atomic_load_n(&stop_flushers, __ATOMIC_ACQUIRE)) {
		int v = rnd() % NVM;

		pthread_rwlock_rdlock(&vm_alive[v]);
		reclaim(v, scrub ? SF_WHY_SCRUB : SF_WHY_TARGETED,
			scrub ? "scrub" : "reclaim");
		pthread_rwlock_unlock(&vm_alive[v]);
		if (rnd() % 4 == 0)
			sched_yield();
	}
	return NULL;
}

/* Take CPUs offline and back online, one at a time (never CPU 0). */
static void *hotplug_thread(void *arg)
{
	(void)arg;
	seed_rng(99);
	while (!__atomic_load_n(&stop_flushers, __ATOMIC_ACQUIRE)) {
		int cpu = rnd() % 2 ? 1 : 2 + (int)(rnd() % (SIM_NR_CPUS - 2));
		bool off = false;

		usleep(200 + rnd() % 500);
		__atomic_store_n(&want_offline[cpu], 1, __ATOMIC_RELEASE);
		while (!off) {
			pthread_mutex_lock(&ipiq[cpu].lock);
			off = is_offline[cpu];
			pthread_mutex_unlock(&ipiq[cpu].lock);
			if (!off)
				sched_yield();
		}
		usleep(rnd() % 300);
		/* The CPU is offline: the online callback runs before it runs tasks. */
		__atomic_store_n(&want_offline[cpu], 0, __ATOMIC_RELAXED);
		sf_cpu_reset(cpu);
		__atomic_store_n(&online_ready[cpu], 1, __ATOMIC_RELEASE);
		__atomic_fetch_add(&hotplugs, 1, __ATOMIC_RELAXED);
	}
	return NULL;
}

/* Destroy VM 1 and create a new VM at the same key, repeatedly. */
static void *lifecycle_thread(void *arg)
{
	const int v = 1;
	int k, cpu;

	(void)arg;
	seed_rng(4242);
	while (!__atomic_load_n(&stop_flushers, __ATOMIC_ACQUIRE)) {
		struct sf_vm *vm;

		usleep(3000 + rnd() % 4000);
		pthread_rwlock_wrlock(&vm_alive[v]);
		__atomic_store_n(&vm_runnable[v], 0, __ATOMIC_RELEASE);
		for (k = 0; k < NVCPU; k++)
			while (__atomic_load_n(&vcpu_busy[v][k],
					       __ATOMIC_ACQUIRE))
				sched_yield();
		/* An SEV VM is flushed on destroy; a plain VM is not. */
		if (rnd() % 2)
			reclaim(v, SF_WHY_TARGETED, "destroy");
		vm = sf_vm_unlink(&vm_keys[v]);
		synchronize_rcu();
		if (vm)
			sf_env_vm_free(vm);
		/* Entries so far belong to the dead VM. */
		for (cpu = 0; cpu < SIM_NR_CPUS; cpu++)
			__atomic_store_n(&base[cpu][v],
					 __atomic_load_n(&entries[cpu][v],
							 __ATOMIC_ACQUIRE),
					 __ATOMIC_RELEASE);
		/* Creation hook: a new VM has a known (empty) past. */
		rcu_read_lock();
		sf_vm_get_or_create(&vm_keys[v], false);
		rcu_read_unlock();
		__atomic_fetch_add(&lifecycles, 1, __ATOMIC_RELAXED);
		__atomic_store_n(&vm_runnable[v], 1, __ATOMIC_RELEASE);
		pthread_rwlock_unlock(&vm_alive[v]);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t cpus[SIM_NR_CPUS], fl[NRECLAIM + NSCRUB], lc, hp;
	double secs = argc > 1 ? atof(argv[1]) : 2.0;
	struct sf_vm *vm;
	long i;

	sf_core_init();
	sf_flush_how = SF_FLUSH_WBNOINVD;
	for (i = 0; i < SIM_NR_CPUS; i++)
		pthread_mutex_init(&ipiq[i].lock, NULL);
	for (i = 0; i < NVM; i++)
		pthread_rwlock_init(&vm_alive[i], NULL);

	/* Phase 1: VM 2 runs before the probe is live. */
	__atomic_store_n(&vm_runnable[2], 1, __ATOMIC_RELEASE);
	for (i = 0; i < SIM_NR_CPUS; i++)
		pthread_create(&cpus[i], NULL, cpu_thread, (void *)i);
	for (i = 0; i < NRECLAIM + NSCRUB; i++)
		pthread_create(&fl[i], NULL, flusher_thread, (void *)i);
	usleep(20000);

	/* Phase 2: probe live on every CPU; VMs 0 and 1 are created now. */
	__atomic_store_n(&probe_live, 1, __ATOMIC_RELEASE);
	synchronize_rcu();
	__atomic_store_n(&sf_tracking_exact, true, __ATOMIC_RELEASE);
	for (i = 0; i < 2; i++) {
		rcu_read_lock();
		sf_vm_get_or_create(&vm_keys[i], false);
		rcu_read_unlock();
		__atomic_store_n(&vm_runnable[i], 1, __ATOMIC_RELEASE);
	}
	pthread_create(&lc, NULL, lifecycle_thread, NULL);
	pthread_create(&hp, NULL, hotplug_thread, NULL);

	usleep((useconds_t)(secs * 1e6));
	__atomic_store_n(&stop_flushers, 1, __ATOMIC_RELEASE);
	for (i = 0; i < NRECLAIM + NSCRUB; i++)
		pthread_join(fl[i], NULL);
	pthread_join(lc, NULL);
	pthread_join(hp, NULL);
	__atomic_store_n(&stop_cpus, 1, __ATOMIC_RELEASE);
	for (i = 0; i < SIM_NR_CPUS; i++)
		pthread_join(cpus[i], NULL);

	printf("stress: %d cpus, %d vms x %d vcpus, %d reclaimers, %d scrubbers, %.1f s\n",
	       SIM_NR_CPUS, NVM, NVCPU, NRECLAIM, NSCRUB, secs);
	printf("stress: reclaims checked %ld, vm lifecycles %ld, cpu hotplugs %ld, violations %ld\n",
	       reclaims, lifecycles, hotplugs, violations);
	printf("stress: targeted flushes %lld (cpus %lld), full %lld, scrubs %lld (cpus %lld)\n",
	       atomic64_read(&sf_stats.flushes),
	       atomic64_read(&sf_stats.flushed_cpus),
	       atomic64_read(&sf_stats.full_flushes),
	       atomic64_read(&sf_stats.scrubs),
	       atomic64_read(&sf_stats.scrubbed_cpus));
	(void)slow_entries_hint;

	while ((vm = sf_vm_unlink(NULL)))
		sf_env_vm_free(vm);

	if (violations) {
		printf("stress: FAIL\n");
		return 1;
	}
	if (reclaims == 0 || lifecycles == 0 || hotplugs == 0) {
		printf("stress: FAIL (nothing exercised)\n");
		return 1;
	}
	printf("stress: PASS\n");
	return 0;
}
