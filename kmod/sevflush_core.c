// SPDX-License-Identifier: GPL-2.0
/*
 * sevflush core: per-VM dirty-CPU tracking and the clear-on-flush protocol.
 *
 * Every guest entry marks the entering CPU in its VM's dirty set (and ran
 * set). A flush of a VM takes the VM's flush lock, atomically takes and
 * clears the dirty set (the snapshot), and sends one IPI to every CPU of the
 * snapshot. The IPI handler writes back this CPU's caches and resets this
 * CPU's "already marked" cache, so the next entry of this CPU marks it
 * again. The lock keeps a second flusher from reading an emptied set while
 * the first flusher's IPIs are in flight. kmod/model/sevflush.pml models
 * this protocol.
 */
#ifdef __KERNEL__
#include <linux/hash.h>
#include <linux/smp.h>
#endif

#include "sevflush_core.h"

DEFINE_PER_CPU(struct sf_pcpu, sf_pcpu);

struct sf_stats sf_stats;

/* Bumped whenever a record is unlinked: invalidates every per-CPU cache. */
unsigned long sf_gen = 1;

/* Cache write-back instruction used by targeted flushes. */
unsigned long sf_flush_how = SF_FLUSH_WBINVD;

/* Set once the entry probe runs on every CPU; records made before are unknown. */
bool sf_tracking_exact;

static DEFINE_RAW_SPINLOCK(sf_table_lock);
static struct sf_vm __rcu *sf_table[SF_HASH_SIZE];

static inline unsigned int sf_hash(const void *kvm)
{
	return hash_ptr((void *)kvm, SF_HASH_BITS);
}

void sf_core_init(void)
{
	unsigned int i;

	for (i = 0; i < SF_HASH_SIZE; i++)
		RCU_INIT_POINTER(sf_table[i], NULL);
	WRITE_ONCE(sf_gen, 1);
}

void sf_vm_init(struct sf_vm *vm, const void *kvm)
{
	vm->key = kvm;
	RCU_INIT_POINTER(vm->next, NULL);
	spin_lock_init(&vm->flush_lock);
	vm->flags = 0;
	vm->conf = SF_CONF_UNKNOWN;
	atomic64_set(&vm->flushes, 0);
	atomic64_set(&vm->flushed_cpus, 0);
	atomic64_set(&vm->full_flushes, 0);
	atomic64_set(&vm->scrubs, 0);
	atomic64_set(&vm->scrubbed_cpus, 0);
	cpumask_clear(&vm->dirty);
	cpumask_clear(&vm->ran);
	cpumask_clear(&vm->snap);
}

/* Caller holds rcu_read_lock() or sf_table_lock. */
struct sf_vm *sf_vm_lookup(const void *kvm)
{
	struct sf_vm *vm;

	for (vm = rcu_dereference_check(sf_table[sf_hash(kvm)],
					lockdep_is_held(&sf_table_lock));
	     vm;
	     vm = rcu_dereference_check(vm->next,
					lockdep_is_held(&sf_table_lock))) {
		if (vm->key == kvm)
			return vm;
	}
	return NULL;
}

/* Read a hash chain link; caller holds sf_table_lock. */
static inline struct sf_vm *sf_slot(struct sf_vm __rcu **p)
{
	return rcu_dereference_protected(*p, lockdep_is_held(&sf_table_lock));
}

/* Find a record by its sysfs id. Caller holds rcu_read_lock(). */
struct sf_vm *sf_vm_find_id(u64 id)
{
	struct sf_vm *vm;
	unsigned int b;

	for (b = 0; b < SF_HASH_SIZE; b++) {
		for (vm = rcu_dereference(sf_table[b]); vm;
		     vm = rcu_dereference(vm->next)) {
			if (vm->id == id)
				return vm;
		}
	}
	return NULL;
}

/*
 * Return the record of @kvm, creating it if there is none. Caller holds
 * rcu_read_lock(); any context, the record is allocated by the environment
 * without sleeping. Returns NULL when allocation fails: the VM then has no
 * record and every flush made for it is a full flush.
 */
struct sf_vm *sf_vm_get_or_create(const void *kvm, bool unknown_past)
{
	struct sf_vm *vm, *old;
	unsigned long flags;
	unsigned int b;

	vm = sf_vm_lookup(kvm);
	if (vm)
		return vm;

	vm = sf_env_vm_alloc(kvm);
	if (!vm) {
		atomic64_inc(&sf_stats.alloc_failures);
		return NULL;
	}
	if (unknown_past || !READ_ONCE(sf_tracking_exact))
		set_bit(SF_VM_UNKNOWN_PAST, &vm->flags);

	b = sf_hash(kvm);
	raw_spin_lock_irqsave(&sf_table_lock, flags);
	old = sf_vm_lookup(kvm);
	if (!old) {
		RCU_INIT_POINTER(vm->next, sf_slot(&sf_table[b]));
		rcu_assign_pointer(sf_table[b], vm);
	}
	raw_spin_unlock_irqrestore(&sf_table_lock, flags);

	if (old) {
		sf_env_vm_free(vm);
		return old;
	}
	sf_env_vm_published(vm);
	return vm;
}

static struct sf_vm *sf_vm_unlink_locked(unsigned int b, const void *kvm)
{
	struct sf_vm __rcu **pp = &sf_table[b];
	struct sf_vm *vm;

	while ((vm = sf_slot(pp))) {
		if (!kvm || vm->key == kvm) {
			rcu_assign_pointer(*pp, sf_slot(&vm->next));
#ifndef SF_BUG_NO_GEN_BUMP
			/*
			 * Release: publish the unlink before the new
			 * generation. An entry that reads the new generation
			 * cannot find this record, and no per-CPU cache filled
			 * before the bump matches any more, so a new VM at the
			 * same address is marked from its first entry.
			 */
			smp_store_release(&sf_gen, sf_gen + 1);
#endif
			return vm;
		}
		pp = &vm->next;
	}
	return NULL;
}

/*
 * Unlink the record of @kvm, or any record when @kvm is NULL. The caller
 * frees it after an RCU grace period.
 */
struct sf_vm *sf_vm_unlink(const void *kvm)
{
	struct sf_vm *vm = NULL;
	unsigned long flags;
	unsigned int b;

	raw_spin_lock_irqsave(&sf_table_lock, flags);
	if (kvm) {
		vm = sf_vm_unlink_locked(sf_hash(kvm), kvm);
	} else {
		for (b = 0; b < SF_HASH_SIZE && !vm; b++)
			vm = sf_vm_unlink_locked(b, NULL);
	}
	raw_spin_unlock_irqrestore(&sf_table_lock, flags);
	return vm;
}

/*
 * Slow path of sf_enter(): this CPU's cache holds another VM, or was reset
 * by a flush, or predates a generation bump. IRQs are off.
 */
void sf_enter_slow(const void *kvm)
{
	struct sf_pcpu *c = this_cpu_ptr(&sf_pcpu);
	unsigned int cpu = smp_processor_id();
	unsigned long gen;
	struct sf_vm *vm;

	/* Read the generation before the lookup; see sf_vm_unlink_locked(). */
	gen = smp_load_acquire(&sf_gen);

	rcu_read_lock();
	vm = sf_vm_get_or_create(kvm, true);
	if (vm) {
		/* Test before set: no locked operation when already set. */
		if (!cpumask_test_cpu(cpu, &vm->dirty))
			cpumask_set_cpu(cpu, &vm->dirty);
		if (!cpumask_test_cpu(cpu, &vm->ran))
			cpumask_set_cpu(cpu, &vm->ran);
		c->kvm = kvm;
		c->gen = gen;
	} else {
		c->kvm = NULL;
	}
	rcu_read_unlock();
}

/*
 * Flush IPI handler, on each CPU of a snapshot (or every CPU for a full
 * flush), with IRQs off. Resetting the cache makes this CPU's next guest
 * entry mark it again in its VM's dirty set.
 */
void sf_flush_ipi(void *info)
{
#ifndef SF_BUG_NO_CACHE_RESET
	this_cpu_ptr(&sf_pcpu)->kvm = NULL;
#endif
	if ((unsigned long)info == SF_FLUSH_WBNOINVD)
		sf_env_wbnoinvd();
	else
		sf_env_wbinvd();
}

/*
 * Reset @cpu's cache when it comes back online. Flush IPIs skip offline
 * CPUs, so a flush may have cleared its dirty bit without resetting it.
 */
void sf_cpu_reset(unsigned int cpu)
{
#ifdef SF_BUG_NO_ONLINE_RESET
	(void)cpu;
#else
	per_cpu_ptr(&sf_pcpu, cpu)->kvm = NULL;
#endif
}

/* Stock-equivalent full flush: WBINVD on every online CPU. */
void sf_flush_all(void)
{
	on_each_cpu(sf_flush_ipi, (void *)SF_FLUSH_WBINVD, 1);
	atomic64_inc(&sf_stats.full_flushes);
}

/* Count a stock all-CPU flush made for @vm (NULL: no record). */
void sf_full_flush_seen(struct sf_vm *vm)
{
	atomic64_inc(&sf_stats.full_flushes);
	if (vm)
		atomic64_inc(&vm->full_flushes);
}

/* Take and clear the dirty set into vm->snap. Caller holds flush_lock. */
static unsigned int sf_snapshot_clear(struct sf_vm *vm, struct cpumask *mask)
{
	unsigned long *dirty = cpumask_bits(&vm->dirty);
	unsigned long *snap = cpumask_bits(mask);
	unsigned int i;

	for (i = 0; i < BITS_TO_LONGS(nr_cpu_ids); i++)
		snap[i] = READ_ONCE(dirty[i]) ? xchg(&dirty[i], 0) : 0;
	return cpumask_weight(mask);
}

/*
 * sf_flush_vm - write back the caches of every CPU that may hold lines of
 * @vm's guest, and clear @vm's dirty set.
 *
 * Callers flush after the guest lost access to the memory being reclaimed.
 * A CPU that entered the guest before that point is in the dirty set or in
 * the snapshot of a flush still in flight; the flush lock waits for that
 * flush, so the snapshot taken here holds every CPU not flushed since its
 * last entry. Entries after the snapshot cannot touch the reclaimed memory.
 *
 * Runs in process context or with preemption off, always with IRQs on, as
 * on_each_cpu_mask() requires. Returns the number of CPUs flushed.
 */
unsigned int sf_flush_vm(struct sf_vm *vm, enum sf_why why)
{
#ifdef SF_BUG_NO_SERIALIZE
	/* Harness-only variant: flushers run unserialized, own snapshots. */
	struct cpumask snapbuf, *snap = &snapbuf;
#else
	struct cpumask *snap = &vm->snap;
#endif
	unsigned int n;
	bool full;

#ifndef SF_BUG_NO_SERIALIZE
	spin_lock(&vm->flush_lock);
#endif
	full = test_bit(SF_VM_UNKNOWN_PAST, &vm->flags);
	n = sf_snapshot_clear(vm, snap);
	SF_TEST_WINDOW();
	if (full) {
		/*
		 * CPUs may have entered before the probe saw this VM: flush
		 * every CPU once, then track exactly.
		 */
		on_each_cpu(sf_flush_ipi, (void *)SF_FLUSH_WBINVD, 1);
		n = num_online_cpus();
		clear_bit(SF_VM_UNKNOWN_PAST, &vm->flags);
	} else if (n) {
		on_each_cpu_mask(snap, sf_flush_ipi,
				 (void *)READ_ONCE(sf_flush_how), 1);
	}
#ifndef SF_BUG_NO_SERIALIZE
	spin_unlock(&vm->flush_lock);
#endif

	if (full) {
		atomic64_inc(&sf_stats.full_flushes);
		atomic64_inc(&vm->full_flushes);
	} else if (why == SF_WHY_SCRUB) {
		atomic64_inc(&sf_stats.scrubs);
		atomic64_add(n, &sf_stats.scrubbed_cpus);
		atomic64_inc(&vm->scrubs);
		atomic64_add(n, &vm->scrubbed_cpus);
	} else {
		atomic64_inc(&sf_stats.flushes);
		atomic64_add(n, &sf_stats.flushed_cpus);
		atomic64_inc(&vm->flushes);
		atomic64_add(n, &vm->flushed_cpus);
	}
	return n;
}
