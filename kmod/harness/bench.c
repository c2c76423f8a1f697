// SPDX-License-Identifier: GPL-2.0
/*
 * Single-threaded driver for counting the instructions of the kvm_entry
 * probe with callgrind (see probe-cost.sh). sf_probe() mirrors the kernel
 * probe in sevflush_main.c: load vcpu->kvm, then sf_enter().
 *
 *   bench hot N    N entries of one VM on one CPU: already-marked path
 *   bench first N  N entries, each after a flush reset this CPU's cache
 *                  and cleared its dirty bit: first-mark path
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../sevflush_core.h"

pthread_rwlock_t sim_rcu = PTHREAD_RWLOCK_INITIALIZER;
__thread int sim_cpu;

struct kvm_vcpu {
	void *kvm;
};

struct sf_vm *sf_env_vm_alloc(const void *kvm)
{
	struct sf_vm *vm = calloc(1, sizeof(*vm));

	if (vm)
		sf_vm_init(vm, kvm);
	return vm;
}

void sf_env_vm_free(struct sf_vm *vm)
{
	free(vm);
}

void sf_env_vm_published(struct sf_vm *vm)
{
	(void)vm;
}

void sf_env_wbinvd(void)
{
}

void sf_env_wbnoinvd(void)
{
}

void on_each_cpu_mask(const struct cpumask *mask, smp_call_func_t func,
		      void *info, bool wait)
{
	(void)mask; (void)wait;
	func(info);
}

void on_each_cpu(smp_call_func_t func, void *info, int wait)
{
	(void)wait;
	func(info);
}

void sim_test_window(void)
{
}

__attribute__((noinline))
void sf_probe(void *data, struct kvm_vcpu *vcpu, bool force_immediate_exit)
{
	(void)data;
	(void)force_immediate_exit;
	sf_enter(vcpu->kvm);
}

int main(int argc, char **argv)
{
	static char kvm_obj;
	struct kvm_vcpu vcpu = { &kvm_obj };
	long i, n = argc > 2 ? atol(argv[2]) : 1000000;
	bool first = argc > 1 && !strcmp(argv[1], "first");
	struct sf_vm *vm;

	sf_core_init();
	sf_tracking_exact = true;
	sim_cpu = 3;
	rcu_read_lock();
	vm = sf_vm_get_or_create(&kvm_obj, false);
	rcu_read_unlock();
	sf_probe(NULL, &vcpu, false);
	for (i = 0; i < n; i++) {
		if (first) {
			/* What a flush does to this CPU: clear, then reset. */
			cpumask_bits(&vm->dirty)[0] = 0;
			this_cpu_ptr(&sf_pcpu)->kvm = NULL;
		}
		sf_probe(NULL, &vcpu, false);
	}
	printf("%s: %ld entries, dirty weight %u\n", first ? "first" : "hot",
	       n, cpumask_weight(&vm->dirty));
	return 0;
}
