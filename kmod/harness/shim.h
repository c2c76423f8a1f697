/* SPDX-License-Identifier: GPL-2.0 */
/*
 * User-space stand-ins for the kernel primitives used by sevflush_core.c.
 *
 * Simulated CPUs are threads; sim_cpu is the simulated CPU id of the
 * calling thread. An IPI is a request queued to the target CPU's thread,
 * which runs it between two guest entries, as a real CPU takes interrupts
 * only with IRQs on. RCU read sections are read locks of a reader-preferring
 * rwlock; synchronize_rcu() takes it for writing.
 */
#ifndef _SF_SHIM_H
#define _SF_SHIM_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifndef SIM_NR_CPUS
#define SIM_NR_CPUS	8
#endif

typedef uint64_t u64;
typedef uint32_t u32;

#define likely(x)		__builtin_expect(!!(x), 1)
#define unlikely(x)		__builtin_expect(!!(x), 0)
#ifndef __always_inline
#define __always_inline		inline __attribute__((__always_inline__))
#endif
#define __rcu

#define READ_ONCE(x)		__atomic_load_n(&(x), __ATOMIC_RELAXED)
#define WRITE_ONCE(x, v)	__atomic_store_n(&(x), (v), __ATOMIC_RELAXED)
#define smp_load_acquire(p)	__atomic_load_n((p), __ATOMIC_ACQUIRE)
#define smp_store_release(p, v)	__atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define xchg(p, v)		__atomic_exchange_n((p), (v), __ATOMIC_SEQ_CST)

/* RCU */
extern pthread_rwlock_t sim_rcu;
#ifdef SIM_RCU_CHEAP
/* Single-threaded cost runs: a kernel RCU read section costs about this. */
#define rcu_read_lock()		__atomic_signal_fence(__ATOMIC_SEQ_CST)
#define rcu_read_unlock()	__atomic_signal_fence(__ATOMIC_SEQ_CST)
#else
#define rcu_read_lock()		pthread_rwlock_rdlock(&sim_rcu)
#define rcu_read_unlock()	pthread_rwlock_unlock(&sim_rcu)
#endif
#define synchronize_rcu()	do { pthread_rwlock_wrlock(&sim_rcu); \
				     pthread_rwlock_unlock(&sim_rcu); } while (0)
#define lockdep_is_held(l)	1
#define rcu_dereference_check(p, c)	__atomic_load_n(&(p), __ATOMIC_ACQUIRE)
#define rcu_dereference(p)		__atomic_load_n(&(p), __ATOMIC_ACQUIRE)
#define rcu_dereference_protected(p, c)	__atomic_load_n(&(p), __ATOMIC_RELAXED)
#define rcu_assign_pointer(p, v)	__atomic_store_n(&(p), (v), __ATOMIC_RELEASE)
#define RCU_INIT_POINTER(p, v)		__atomic_store_n(&(p), (v), __ATOMIC_RELAXED)

/* per-CPU */
extern __thread int sim_cpu;
#define DECLARE_PER_CPU(type, name)	extern type name[SIM_NR_CPUS]
#define DEFINE_PER_CPU(type, name)	type name[SIM_NR_CPUS]
#define this_cpu_ptr(p)			(&(*(p))[sim_cpu])
#define per_cpu_ptr(p, cpu)		(&(*(p))[(cpu)])
#define smp_processor_id()		((unsigned int)sim_cpu)

/* bit operations and cpumasks */
#define BITS_PER_LONG		64
#define BIT(n)			(1UL << (n))
#define BITS_TO_LONGS(n)	(((n) + BITS_PER_LONG - 1) / BITS_PER_LONG)
#define nr_cpu_ids		((unsigned int)SIM_NR_CPUS)

struct cpumask {
	unsigned long bits[BITS_TO_LONGS(SIM_NR_CPUS)];
};

#define cpumask_bits(m)		((m)->bits)

static inline bool test_bit(unsigned int nr, const unsigned long *a)
{
	return (__atomic_load_n(&a[nr / BITS_PER_LONG], __ATOMIC_RELAXED) >>
		(nr % BITS_PER_LONG)) & 1;
}

static inline void set_bit(unsigned int nr, unsigned long *a)
{
	__atomic_fetch_or(&a[nr / BITS_PER_LONG], 1UL << (nr % BITS_PER_LONG),
			  __ATOMIC_SEQ_CST);
}

static inline void clear_bit(unsigned int nr, unsigned long *a)
{
	__atomic_fetch_and(&a[nr / BITS_PER_LONG],
			   ~(1UL << (nr % BITS_PER_LONG)), __ATOMIC_SEQ_CST);
}

static inline bool cpumask_test_cpu(unsigned int cpu, const struct cpumask *m)
{
	return test_bit(cpu, m->bits);
}

static inline void cpumask_set_cpu(unsigned int cpu, struct cpumask *m)
{
	set_bit(cpu, m->bits);
}

static inline void cpumask_clear(struct cpumask *m)
{
	unsigned int i;

	for (i = 0; i < BITS_TO_LONGS(SIM_NR_CPUS); i++)
		__atomic_store_n(&m->bits[i], 0, __ATOMIC_RELAXED);
}

static inline unsigned int cpumask_weight(const struct cpumask *m)
{
	unsigned int i, n = 0;

	for (i = 0; i < BITS_TO_LONGS(SIM_NR_CPUS); i++)
		n += __builtin_popcountl(__atomic_load_n(&m->bits[i],
							 __ATOMIC_RELAXED));
	return n;
}

#define num_online_cpus()	((unsigned int)SIM_NR_CPUS)

/* locks */
typedef struct { pthread_mutex_t m; } spinlock_t;
typedef spinlock_t raw_spinlock_t;
#define DEFINE_RAW_SPINLOCK(n)	raw_spinlock_t n = { PTHREAD_MUTEX_INITIALIZER }
#define spin_lock_init(l)	pthread_mutex_init(&(l)->m, NULL)
#define spin_lock(l)		pthread_mutex_lock(&(l)->m)
#define spin_unlock(l)		pthread_mutex_unlock(&(l)->m)
#define raw_spin_lock_irqsave(l, f)	 do { (void)(f); pthread_mutex_lock(&(l)->m); } while (0)
#define raw_spin_unlock_irqrestore(l, f) do { (void)(f); pthread_mutex_unlock(&(l)->m); } while (0)

/* atomics */
typedef struct { long long counter; } atomic64_t;
#define atomic64_set(a, v)	__atomic_store_n(&(a)->counter, (v), __ATOMIC_RELAXED)
#define atomic64_read(a)	__atomic_load_n(&(a)->counter, __ATOMIC_RELAXED)
#define atomic64_inc(a)		__atomic_fetch_add(&(a)->counter, 1, __ATOMIC_RELAXED)
#define atomic64_add(n, a)	__atomic_fetch_add(&(a)->counter, (n), __ATOMIC_RELAXED)

static inline unsigned int hash_ptr(const void *p, unsigned int bits)
{
	return (unsigned int)(((uint64_t)(uintptr_t)p *
			       0x61C8864680B583EBULL) >> (64 - bits));
}

/* IPIs, implemented by the harness. */
typedef void (*smp_call_func_t)(void *info);
void on_each_cpu_mask(const struct cpumask *mask, smp_call_func_t func,
		      void *info, bool wait);
void on_each_cpu(smp_call_func_t func, void *info, int wait);

/* Race-window widener between snapshot and IPIs. */
void sim_test_window(void);
#define SF_TEST_WINDOW()	sim_test_window()

#endif /* _SF_SHIM_H */
