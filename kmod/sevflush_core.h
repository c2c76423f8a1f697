/* SPDX-License-Identifier: GPL-2.0 */
/*
 * sevflush core: per-VM dirty-CPU tracking and the clear-on-flush protocol.
 *
 * This file and sevflush_core.c compile unchanged in the kernel and in the
 * user-space harness (kmod/harness), which supplies the kernel primitives
 * used here from harness/shim.h.
 */
#ifndef _SEVFLUSH_CORE_H
#define _SEVFLUSH_CORE_H

#ifdef __KERNEL__
#include <linux/atomic.h>
#include <linux/bits.h>
#include <linux/compiler.h>
#include <linux/cpumask.h>
#include <linux/percpu.h>
#include <linux/rcupdate.h>
#include <linux/spinlock.h>
#include <linux/types.h>
/* Hook for the harness to widen race windows; empty in the kernel. */
#define SF_TEST_WINDOW()	do { } while (0)
#else
#include "shim.h"
#endif

#define SF_HASH_BITS		8
#define SF_HASH_SIZE		BIT(SF_HASH_BITS)

/* struct sf_vm.flags bits */
#define SF_VM_UNKNOWN_PAST	0	/* CPUs may have entered unmarked */

/* How a CPU flushes its caches in the flush IPI. */
#define SF_FLUSH_WBINVD		0UL
#define SF_FLUSH_WBNOINVD	1UL

/* Why a VM is flushed; selects the counters. */
enum sf_why {
	SF_WHY_TARGETED,	/* in place of a stock all-CPU flush */
	SF_WHY_SCRUB,		/* asked for through sysfs scrub */
};

/* Confidential class label written by the agent; reporting only. */
enum sf_conf {
	SF_CONF_UNKNOWN,
	SF_CONF_NONE,
	SF_CONF_SEV,
	SF_CONF_SEV_ES,
	SF_CONF_SEV_SNP,
	SF_CONF_NR,
};

/*
 * Per-CPU "already marked" cache: this CPU is in the dirty set of the VM
 * keyed @kvm, as of global generation @gen. The key is only compared, never
 * dereferenced.
 */
struct sf_pcpu {
	const void *kvm;
	unsigned long gen;
};

DECLARE_PER_CPU(struct sf_pcpu, sf_pcpu);

/* One record per VM, keyed by its struct kvm pointer. */
struct sf_vm {
	const void *key;
	struct sf_vm __rcu *next;	/* hash chain, under sf_table_lock */
	spinlock_t flush_lock;		/* serializes flushers of this VM */
	unsigned long flags;
	u64 id;				/* sysfs vms/<id> */
	int pid;			/* tgid of the process that made it */
	int conf;			/* enum sf_conf */
	atomic64_t flushes;		/* targeted flushes */
	atomic64_t flushed_cpus;	/* CPUs flushed by targeted flushes */
	atomic64_t full_flushes;	/* full flushes made or seen */
	atomic64_t scrubs;		/* flushes asked for through scrub */
	atomic64_t scrubbed_cpus;	/* CPUs flushed by scrubs */
	struct cpumask dirty;		/* entered since their last flush */
	struct cpumask ran;		/* ever entered */
	struct cpumask snap;		/* flush snapshot, under flush_lock */
};

/* Global counters, exported in sysfs. */
struct sf_stats {
	atomic64_t flushes;
	atomic64_t flushed_cpus;
	atomic64_t full_flushes;
	atomic64_t scrubs;
	atomic64_t scrubbed_cpus;
	atomic64_t alloc_failures;
};

extern struct sf_stats sf_stats;
extern unsigned long sf_gen;
extern unsigned long sf_flush_how;
extern bool sf_tracking_exact;

/*
 * Environment callbacks, implemented by sevflush_main.c in the kernel and by
 * the harness in user space.
 */
struct sf_vm *sf_env_vm_alloc(const void *kvm);	/* atomic context */
void sf_env_vm_free(struct sf_vm *vm);		/* never inserted */
void sf_env_vm_published(struct sf_vm *vm);	/* atomic context */
void sf_env_wbinvd(void);
void sf_env_wbnoinvd(void);

void sf_core_init(void);
void sf_vm_init(struct sf_vm *vm, const void *kvm);
struct sf_vm *sf_vm_lookup(const void *kvm);
struct sf_vm *sf_vm_find_id(u64 id);
struct sf_vm *sf_vm_get_or_create(const void *kvm, bool unknown_past);
struct sf_vm *sf_vm_unlink(const void *kvm);
void sf_enter_slow(const void *kvm);
void sf_flush_ipi(void *info);
void sf_cpu_reset(unsigned int cpu);
unsigned int sf_flush_vm(struct sf_vm *vm, enum sf_why why);
void sf_flush_all(void);
void sf_full_flush_seen(struct sf_vm *vm);

/*
 * sf_enter - mark this CPU in the dirty and ran sets of VM @kvm.
 *
 * Runs on every guest entry with IRQs off. The steady state is one compare
 * of the per-CPU cache: this CPU is still marked in @kvm's dirty set until
 * a flush IPI resets the cache or a record removal bumps sf_gen.
 */
static __always_inline void sf_enter(const void *kvm)
{
	struct sf_pcpu *c = this_cpu_ptr(&sf_pcpu);

	if (likely(c->kvm == kvm && c->gen == READ_ONCE(sf_gen)))
		return;
	sf_enter_slow(kvm);
}

#endif /* _SEVFLUSH_CORE_H */
