// SPDX-License-Identifier: GPL-2.0
/*
 * sevflush: per-VM dirty-CPU tracking for KVM guests and targeted cache
 * flushes for AMD SEV guests, in place of KVM's WBINVD on every CPU.
 *
 * This file holds the kernel side: the kvm_entry tracepoint probe, the VM
 * lifetime hooks, the targeted-flush hooks, sysfs and module parameters.
 * sevflush_core.c holds the tracking and the flush protocol. docs/kmod.md
 * describes the design; docs/abi.md the sysfs ABI.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/cpuhotplug.h>
#include <linux/delay.h>
#include <linux/kobject.h>
#include <linux/kprobes.h>
#include <linux/kvm_host.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/sysfs.h>
#include <linux/tracepoint.h>
#include <linux/workqueue.h>
#include <asm/cpufeature.h>
#include <asm/special_insns.h>

#include "sevflush_core.h"

#define SF_ABI_VERSION	1

#if !defined(SEVFLUSH_KVM_ENTRY_ARGS) || !defined(SEVFLUSH_KVM_FLUSHES_MASK) || \
	!defined(SEVFLUSH_HAS_DECLARE_TRACE_EVENT)
#error "SEVFLUSH_* kernel probes are set by Kbuild"
#endif

/*
 * Re-declaration of KVM's kvm_entry tracepoint (arch/x86/kvm/trace.h, not
 * in the headers packages). kvm.ko exports __tracepoint_kvm_entry. Linux
 * 6.9, 6.6.103+ and 6.1.149+ pass force_immediate_exit as second argument;
 * Kbuild picks the prototype from the kernel headers.
 */
#if SEVFLUSH_HAS_DECLARE_TRACE_EVENT
/* 6.16+: DECLARE_TRACE() appends _tp; this is the old DECLARE_TRACE(). */
#define SF_DECLARE_TRACE DECLARE_TRACE_EVENT
#else
#define SF_DECLARE_TRACE DECLARE_TRACE
#endif

#if SEVFLUSH_KVM_ENTRY_ARGS == 2
SF_DECLARE_TRACE(kvm_entry,
		 TP_PROTO(struct kvm_vcpu *vcpu, bool force_immediate_exit),
		 TP_ARGS(vcpu, force_immediate_exit));

static void sf_probe_kvm_entry(void *data, struct kvm_vcpu *vcpu,
			       bool force_immediate_exit)
{
	sf_enter(vcpu->kvm);
}
#else
SF_DECLARE_TRACE(kvm_entry,
		 TP_PROTO(struct kvm_vcpu *vcpu),
		 TP_ARGS(vcpu));

static void sf_probe_kvm_entry(void *data, struct kvm_vcpu *vcpu)
{
	sf_enter(vcpu->kvm);
}
#endif

/* ---- module parameters and mode ---------------------------------------- */

enum { SF_MODE_OBSERVE, SF_MODE_TARGETED };

static const char * const sf_mode_names[] = { "observe", "targeted" };

static int sf_mode;			/* enum above */
static bool sf_mode_wanted_targeted;	/* mode=targeted given at load */
static bool sf_targeted_available;
static bool sf_initialized;

/*
 * Test switch for rigs without SEV hardware: with it on, entering
 * sev_guest_memory_reclaimed() for any tracked VM (SEV or not) flushes that
 * VM's dirty set with the targeted protocol, in any mode. Off by default;
 * it adds flushes and never removes one.
 */
static bool test_treat_all_as_sev;
module_param(test_treat_all_as_sev, bool, 0644);
MODULE_PARM_DESC(test_treat_all_as_sev,
		 "TEST ONLY: flush the dirty set of any VM on sev_guest_memory_reclaimed() (default off)");

/*
 * True when the @count bytes at @buf are exactly @tok, optionally followed
 * by one newline. Unlike sysfs_streq(), bytes after a NUL are not ignored.
 */
static bool sf_token(const char *buf, size_t count, const char *tok)
{
	size_t n = strlen(tok);

	if (count && buf[count - 1] == '\n')
		count--;
	return count == n && !memcmp(buf, tok, n);
}

static int sf_mode_parse(const char *buf, size_t count)
{
	if (sf_token(buf, count, "observe"))
		return SF_MODE_OBSERVE;
	if (sf_token(buf, count, "targeted"))
		return SF_MODE_TARGETED;
	return -EINVAL;
}

static int sf_mode_set(const char *buf, size_t count)
{
	int m = sf_mode_parse(buf, count);

	if (m < 0)
		return m;
	if (!sf_initialized) {
		/* Load time: applied by sevflush_init() once hooks are known. */
		sf_mode_wanted_targeted = m == SF_MODE_TARGETED;
		return 0;
	}
	if (m == SF_MODE_TARGETED && !READ_ONCE(sf_targeted_available))
		return -EINVAL;
	WRITE_ONCE(sf_mode, m);
	return 0;
}

static int sf_mode_param_set(const char *val, const struct kernel_param *kp)
{
	return sf_mode_set(val, strlen(val));
}

static int sf_mode_param_get(char *buf, const struct kernel_param *kp)
{
	return sysfs_emit(buf, "%s\n", sf_mode_names[READ_ONCE(sf_mode)]);
}

static const struct kernel_param_ops sf_mode_param_ops = {
	.set = sf_mode_param_set,
	.get = sf_mode_param_get,
};
module_param_cb(mode, &sf_mode_param_ops, NULL, 0644);
MODULE_PARM_DESC(mode, "observe (default) or targeted");

/* ---- VM records: allocation, sysfs directories, removal ------------- */

struct sf_vm_obj {
	struct kobject kobj;
	struct work_struct add_work;
	struct work_struct del_work;
	bool in_sysfs;
	struct sf_vm vm;
};

static struct workqueue_struct *sf_wq;	/* ordered: add runs before del */
static struct kobject *sf_root_kobj;
static struct kobject *sf_vms_kobj;
static atomic64_t sf_next_id;

static inline struct sf_vm_obj *sf_obj(struct sf_vm *vm)
{
	return container_of(vm, struct sf_vm_obj, vm);
}

static inline struct sf_vm *sf_kobj_vm(struct kobject *kobj)
{
	return &container_of(kobj, struct sf_vm_obj, kobj)->vm;
}

static void sf_vm_release(struct kobject *kobj)
{
	kfree(container_of(kobj, struct sf_vm_obj, kobj));
}

static const struct kobj_type sf_vm_ktype;

static void sf_vm_add_work(struct work_struct *work)
{
	struct sf_vm_obj *o = container_of(work, struct sf_vm_obj, add_work);

	if (kobject_add(&o->kobj, sf_vms_kobj, "%llu", o->vm.id)) {
		pr_warn("vm %llu: no sysfs directory\n", o->vm.id);
		return;
	}
	o->in_sysfs = true;
	kobject_uevent(&o->kobj, KOBJ_ADD);
}

static void sf_vm_del_work(struct work_struct *work)
{
	struct sf_vm_obj *o = container_of(work, struct sf_vm_obj, del_work);

	/* The probe and flushers find records under RCU. */
	synchronize_rcu();
	if (o->in_sysfs)
		kobject_del(&o->kobj);
	kobject_put(&o->kobj);
}

/* Atomic context (the entry probe runs with IRQs off): never sleeps. */
struct sf_vm *sf_env_vm_alloc(const void *kvm)
{
	struct sf_vm_obj *o = kzalloc(sizeof(*o), GFP_ATOMIC | __GFP_NOWARN);

	if (!o)
		return NULL;
	kobject_init(&o->kobj, &sf_vm_ktype);
	INIT_WORK(&o->add_work, sf_vm_add_work);
	INIT_WORK(&o->del_work, sf_vm_del_work);
	sf_vm_init(&o->vm, kvm);
	o->vm.id = atomic64_inc_return(&sf_next_id);
	o->vm.pid = current->tgid;
	return &o->vm;
}

void sf_env_vm_free(struct sf_vm *vm)
{
	kobject_put(&sf_obj(vm)->kobj);
}

void sf_env_vm_published(struct sf_vm *vm)
{
	queue_work(sf_wq, &sf_obj(vm)->add_work);
}

void sf_env_wbinvd(void)
{
	wbinvd();
}

/* WBNOINVD is WBINVD with an F3 prefix; CPUs without it execute WBINVD. */
void sf_env_wbnoinvd(void)
{
	asm volatile(".byte 0xf3, 0x0f, 0x09" : : : "memory");
}

/*
 * A CPU that goes offline gets no flush IPI, so a flush can clear its dirty
 * bit without resetting its cache. Reset the cache when the CPU comes back,
 * before it can run tasks (CPUHP_AP_ONLINE_DYN precedes CPUHP_AP_ACTIVE),
 * so its first guest entry marks it again. Its caches were written back
 * when it went offline.
 */
static int sf_cpu_online(unsigned int cpu)
{
	sf_cpu_reset(cpu);
	return 0;
}

static int sf_cpuhp_state;

static void sf_vm_remove(const void *kvm)
{
	struct sf_vm *vm = sf_vm_unlink(kvm);

	if (vm)
		queue_work(sf_wq, &sf_obj(vm)->del_work);
}

/* ---- VM lifetime hooks ------------------------------------------------ */

/*
 * kvm_arch_init_vm() returning 0: a new VM, before any of its vCPUs exists.
 * Its record starts with a known, empty past once tracking is exact.
 */
struct sf_kvm_data {
	struct kvm *kvm;
};

static int sf_init_vm_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	((struct sf_kvm_data *)ri->data)->kvm = (struct kvm *)regs->di;
	return 0;
}

static int sf_init_vm_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct kvm *kvm = ((struct sf_kvm_data *)ri->data)->kvm;

	if (regs_return_value(regs) == 0) {
		rcu_read_lock();
		sf_vm_get_or_create(kvm, false);
		rcu_read_unlock();
	}
	return 0;
}

static struct kretprobe sf_init_vm_krp = {
	.kp.symbol_name = "kvm_arch_init_vm",
	.entry_handler = sf_init_vm_entry,
	.handler = sf_init_vm_ret,
	.data_size = sizeof(struct sf_kvm_data),
	.maxactive = 16,
};

/*
 * kvm_arch_destroy_vm() entry: the VM has no vCPU running and is freed
 * after this function returns, both on destruction and on a failed
 * creation. Unlinking here bumps the generation, so no per-CPU cache can
 * match a later VM at the same address.
 */
static int sf_destroy_vm_pre(struct kprobe *p, struct pt_regs *regs)
{
	sf_vm_remove((const void *)regs->di);
	return 0;
}

static struct kprobe sf_destroy_vm_kp = {
	.symbol_name = "kvm_arch_destroy_vm",
	.pre_handler = sf_destroy_vm_pre,
};

/* ---- targeted flush hooks --------------------------------------------- */

/*
 * While one of KVM's per-VM flush callers runs, a slot maps the calling
 * task to its VM. The kprobe on wbinvd_on_all_cpus() consults it.
 */
#define SF_CTX_SLOTS	64

struct sf_ctx {
	struct task_struct *task;
	const void *kvm;
	unsigned long seq;		/* claim order */
};

static struct sf_ctx sf_ctx[SF_CTX_SLOTS];
static atomic_long_t sf_ctx_seq = ATOMIC_LONG_INIT(0);

static int sf_ctx_claim(const void *kvm)
{
	int i;

	for (i = 0; i < SF_CTX_SLOTS; i++) {
		if (!READ_ONCE(sf_ctx[i].task) &&
		    !cmpxchg(&sf_ctx[i].task, NULL, current)) {
			WRITE_ONCE(sf_ctx[i].kvm, kvm);
			WRITE_ONCE(sf_ctx[i].seq,
				   atomic_long_inc_return(&sf_ctx_seq));
			return i;
		}
	}
	return -1;
}

static void sf_ctx_release(int i)
{
	WRITE_ONCE(sf_ctx[i].kvm, NULL);
	/* Order the kvm store before the slot becomes free for others. */
	smp_store_release(&sf_ctx[i].task, NULL);
}

/*
 * The VM of the innermost hooked caller that the current task is in. Calls
 * nest: sev_vm_destroy() of a mirror VM drops the last reference to its
 * owner, whose destruction then runs the owner's flushes.
 */
static const void *sf_ctx_find(void)
{
	const void *kvm = NULL;
	unsigned long best = 0;
	int i;

	for (i = 0; i < SF_CTX_SLOTS; i++) {
		if (READ_ONCE(sf_ctx[i].task) == current &&
		    READ_ONCE(sf_ctx[i].seq) > best) {
			best = READ_ONCE(sf_ctx[i].seq);
			kvm = READ_ONCE(sf_ctx[i].kvm);
		}
	}
	return kvm;
}

struct sf_caller_data {
	int slot;
};

static int sf_caller_enter(struct kretprobe_instance *ri, const void *kvm)
{
	struct sf_caller_data *d = (struct sf_caller_data *)ri->data;

	d->slot = sf_ctx_claim(kvm);
	/* No slot: the stock all-CPU flush runs. */
	return d->slot < 0;
}

static int sf_caller_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	sf_ctx_release(((struct sf_caller_data *)ri->data)->slot);
	return 0;
}

static int sf_reclaimed_entry(struct kretprobe_instance *ri,
			      struct pt_regs *regs)
{
	const void *kvm = (const void *)regs->di;
	struct sf_vm *vm;

	if (READ_ONCE(test_treat_all_as_sev) && !irqs_disabled()) {
		rcu_read_lock();
		vm = sf_vm_lookup(kvm);
		if (vm)
			sf_flush_vm(vm, SF_WHY_TARGETED);
		rcu_read_unlock();
	}
	return sf_caller_enter(ri, kvm);
}

static int sf_kvm_arg_entry(struct kretprobe_instance *ri,
			    struct pt_regs *regs)
{
	return sf_caller_enter(ri, (const void *)regs->di);
}

static int sf_vcpu_arg_entry(struct kretprobe_instance *ri,
			     struct pt_regs *regs)
{
	return sf_caller_enter(ri, ((struct kvm_vcpu *)regs->di)->kvm);
}

#define SF_CALLER(sym, entry) {					\
	.kp.symbol_name = sym,						\
	.entry_handler = entry,						\
	.handler = sf_caller_ret,					\
	.data_size = sizeof(struct sf_caller_data),			\
	.maxactive = SF_CTX_SLOTS,					\
}

/*
 * KVM's all-CPU flushes made for one VM (arch/x86/kvm/svm/sev.c, 5.15 to
 * 6.16). sev_flush_asids() is not listed: its flush stays full.
 */
static struct kretprobe sf_callers[] = {
	SF_CALLER("sev_guest_memory_reclaimed", sf_reclaimed_entry),
	SF_CALLER("sev_mem_enc_unregister_region", sf_kvm_arg_entry),
	SF_CALLER("sev_vm_destroy", sf_kvm_arg_entry),
	/* sev_flush_encrypted_page() fallback, inlined into this caller */
	SF_CALLER("sev_free_vcpu", sf_vcpu_arg_entry),
};

static bool sf_caller_ok[ARRAY_SIZE(sf_callers)];

/*
 * Intra-host migration (KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM) hands one VM's
 * ASID to another VM: the source is no longer an SEV guest and is never
 * flushed again, while lines written with that key sit on CPUs in its
 * dirty set, not the destination's. A mirror VM
 * (KVM_CAP_VM_COPY_ENC_CONTEXT_FROM) runs with its owner's ASID. From the
 * first such call on, every flush stays the stock all-CPU flush.
 */
static bool sf_enc_ctx_shared;

static int sf_enc_ctx_pre(struct kprobe *p, struct pt_regs *regs)
{
	if (!READ_ONCE(sf_enc_ctx_shared)) {
		WRITE_ONCE(sf_enc_ctx_shared, true);
		pr_warn("%s: SEV encryption context shared between VMs, targeted flushes off\n",
			p->symbol_name);
	}
	return 0;
}

static struct kprobe sf_enc_ctx_kps[] = {
	{ .symbol_name = "sev_vm_copy_enc_context_from",
	  .pre_handler = sf_enc_ctx_pre, },
	{ .symbol_name = "sev_vm_move_enc_context_from",
	  .pre_handler = sf_enc_ctx_pre, },
};

static bool sf_enc_ctx_ok[ARRAY_SIZE(sf_enc_ctx_kps)];

/* Tasks between the redirect kprobe and the end of the redirect target. */
static atomic_t sf_redirects_active = ATOMIC_INIT(0);

#if SEVFLUSH_KVM_FLUSHES_MASK
/*
 * 6.17+: KVM flushes an SEV VM with sev_writeback_caches(), an inline
 * wrapper of wbnoinvd_on_cpus_mask(have_run_cpus), where have_run_cpus
 * holds every CPU that ever ran the VM and is never cleared. The stock
 * flush is already limited to those CPUs, so wherever this module knows
 * nothing better it lets the stock flush run (counted in
 * full_flushes_total). In targeted mode a VM with a record and a known past
 * is flushed on its dirty set instead, which is a subset of have_run_cpus
 * (pre_sev_run() sets the bit after the kvm_entry tracepoint fired), and
 * the dirty set is cleared on flush.
 */
#define SF_REDIRECT_SYM	"wbnoinvd_on_cpus_mask"

/* Same prototype as wbnoinvd_on_cpus_mask(): the registers are unchanged. */
static void sf_mask_redirect(struct cpumask *have_run_cpus)
{
	const void *kvm = sf_ctx_find();
	struct sf_vm *vm = NULL;

	rcu_read_lock();
	if (kvm)
		vm = sf_vm_lookup(kvm);
	if (vm)
		sf_flush_vm(vm, SF_WHY_TARGETED);
	else
		on_each_cpu_mask(have_run_cpus, sf_flush_ipi,
				 (void *)SF_FLUSH_WBNOINVD, 1);
	rcu_read_unlock();
	atomic_dec(&sf_redirects_active);
}

static int sf_redirect_pre(struct kprobe *p, struct pt_regs *regs)
{
	const void *kvm = sf_ctx_find();
	struct sf_vm *vm;
	bool redirect;

	if (!kvm)
		return 0;	/* not a per-VM flush: stock */
	rcu_read_lock();
	vm = sf_vm_lookup(kvm);
	redirect = vm && READ_ONCE(sf_mode) == SF_MODE_TARGETED &&
		!READ_ONCE(sf_enc_ctx_shared) &&
		!test_bit(SF_VM_UNKNOWN_PAST, &vm->flags);
	if (!redirect)
		sf_full_flush_seen(vm);
	rcu_read_unlock();
	if (!redirect)
		return 0;	/* stock: WBNOINVD on have_run_cpus */
	atomic_inc(&sf_redirects_active);
	instruction_pointer_set(regs, (unsigned long)sf_mask_redirect);
	return 1;
}
#else
/*
 * 5.15-6.16: KVM flushes an SEV VM with wbinvd_on_all_cpus(). In targeted
 * mode the flush made by one of sf_callers for a VM with a record becomes a
 * flush of that VM's dirty set (all CPUs once if its past is unknown).
 */
#define SF_REDIRECT_SYM	"wbinvd_on_all_cpus"

/*
 * Runs in place of wbinvd_on_all_cpus() called by one of sf_callers, in
 * the caller's context (IRQs on), and returns to that caller.
 */
static int sf_wbinvd_redirect(void)
{
	const void *kvm = sf_ctx_find();
	struct sf_vm *vm = NULL;

	rcu_read_lock();
	if (kvm)
		vm = sf_vm_lookup(kvm);
	if (vm)
		sf_flush_vm(vm, SF_WHY_TARGETED);
	else
		sf_flush_all();
	rcu_read_unlock();
	atomic_dec(&sf_redirects_active);
	return 0;
}

static int sf_redirect_pre(struct kprobe *p, struct pt_regs *regs)
{
	const void *kvm = sf_ctx_find();
	struct sf_vm *vm;

	if (!kvm)
		return 0;	/* not a per-VM flush: stock */
	if (READ_ONCE(sf_mode) != SF_MODE_TARGETED ||
	    READ_ONCE(sf_enc_ctx_shared)) {
		rcu_read_lock();
		vm = sf_vm_lookup(kvm);
		sf_full_flush_seen(vm);
		rcu_read_unlock();
		return 0;
	}
	atomic_inc(&sf_redirects_active);
	instruction_pointer_set(regs, (unsigned long)sf_wbinvd_redirect);
	return 1;
}
#endif

static struct kprobe sf_wbinvd_kp = {
	.symbol_name = SF_REDIRECT_SYM,
	.pre_handler = sf_redirect_pre,
};

static bool sf_wbinvd_kp_ok, sf_init_vm_ok;

#if SEVFLUSH_KVM_FLUSHES_MASK
/*
 * The test hook calls wbnoinvd_on_cpus_mask() itself. The kernel exports
 * it to KVM only (EXPORT_SYMBOL_FOR_KVM), so this module does not link to
 * it: it calls the address the redirect kprobe resolved, through a
 * function pointer. With IBT that indirect call needs ENDBR64 at the
 * function's entry; kprobes place the probe after it (kp.addr is entry + 4)
 * and an exported function keeps it (its __ksymtab entry takes its
 * address, so objtool does not seal it). If the entry holds no ENDBR64 on
 * a CPU with IBT on, the hook refuses with EOPNOTSUPP instead of faulting.
 */
static DEFINE_MUTEX(sf_test_mask_lock);
static struct cpumask sf_test_mask;	/* under sf_test_mask_lock */

static int sf_test_flush(const void *kvm)
{
	static const u8 endbr64[] = { 0xf3, 0x0f, 0x1e, 0xfa };
	void (*flush)(struct cpumask *cpus);
	const u8 *addr;
	struct sf_vm *vm;

	if (!sf_wbinvd_kp_ok)
		return -EOPNOTSUPP;
	addr = (const u8 *)sf_wbinvd_kp.addr;
	if (memcmp(addr - sizeof(endbr64), endbr64, sizeof(endbr64))) {
		if (cpu_feature_enabled(X86_FEATURE_IBT))
			return -EOPNOTSUPP;
		pr_info_once("test_redirect_vm: %s entry has no ENDBR64, IBT off\n",
			     SF_REDIRECT_SYM);
	} else {
		addr -= sizeof(endbr64);
		pr_info_once("test_redirect_vm: %s entry has ENDBR64\n",
			     SF_REDIRECT_SYM);
	}
	flush = (void (*)(struct cpumask *))addr;
	mutex_lock(&sf_test_mask_lock);
	/* KVM passes have_run_cpus: for a VM seen from creation, ran_cpus. */
	rcu_read_lock();
	vm = sf_vm_lookup(kvm);
	if (vm)
		cpumask_copy(&sf_test_mask, &vm->ran);
	rcu_read_unlock();
	if (vm)
		flush(&sf_test_mask);
	mutex_unlock(&sf_test_mask_lock);
	return vm ? 0 : -EINVAL;
}
#else
static int sf_test_flush(const void *kvm)
{
	wbinvd_on_all_cpus();
	return 0;
}
#endif

/*
 * Test switch for rigs without SEV hardware: writing a VM id N to
 * test_redirect_vm makes the flush call KVM's per-VM callers make
 * (wbinvd_on_all_cpus() up to 6.16, wbnoinvd_on_cpus_mask() of the VM's
 * ran CPUs from 6.17), with the caller context of VM N recorded, so the
 * redirect kprobe runs exactly as for an SEV VM: in targeted mode VM N's
 * dirty set is flushed (flushes_total +1); in observe mode the stock flush
 * runs (full_flushes_total +1).
 */
static int sf_test_redirect_set(const char *val, const struct kernel_param *kp)
{
	const void *kvm = NULL;
	struct sf_vm *vm;
	u64 id;
	int slot, ret;

	if (!sf_initialized || kstrtou64(val, 10, &id))
		return -EINVAL;
	rcu_read_lock();
	vm = sf_vm_find_id(id);
	if (vm)
		kvm = vm->key;
	rcu_read_unlock();
	if (!kvm)
		return -EINVAL;
	slot = sf_ctx_claim(kvm);
	if (slot < 0)
		return -EBUSY;
	ret = sf_test_flush(kvm);
	sf_ctx_release(slot);
	return ret;
}

static const struct kernel_param_ops sf_test_redirect_ops = {
	.set = sf_test_redirect_set,
};
module_param_cb(test_redirect_vm, &sf_test_redirect_ops, NULL, 0200);
MODULE_PARM_DESC(test_redirect_vm,
		 "TEST ONLY: write a VM id to run its wbinvd_on_all_cpus() redirect");

/* ---- sysfs --------------------------------------------------------------- */

#define SF_STAT_ATTR(_name, _field)					\
static ssize_t _name##_show(struct kobject *kobj,			\
			    struct kobj_attribute *attr, char *buf)	\
{									\
	return sysfs_emit(buf, "%lld\n",				\
			  (long long)atomic64_read(&sf_stats._field));	\
}									\
static struct kobj_attribute sf_attr_##_name = __ATTR_RO(_name)

SF_STAT_ATTR(flushes_total, flushes);
SF_STAT_ATTR(flushed_cpus_total, flushed_cpus);
SF_STAT_ATTR(full_flushes_total, full_flushes);
SF_STAT_ATTR(scrubs_total, scrubs);
SF_STAT_ATTR(scrubbed_cpus_total, scrubbed_cpus);
SF_STAT_ATTR(alloc_failures_total, alloc_failures);

static ssize_t abi_version_show(struct kobject *kobj,
				struct kobj_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%d\n", SF_ABI_VERSION);
}

static struct kobj_attribute sf_attr_abi_version = __ATTR_RO(abi_version);

static ssize_t targeted_available_show(struct kobject *kobj,
				       struct kobj_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%d\n", READ_ONCE(sf_targeted_available));
}

static struct kobj_attribute sf_attr_targeted_available =
	__ATTR_RO(targeted_available);

static ssize_t enc_context_shared_show(struct kobject *kobj,
				       struct kobj_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%d\n", READ_ONCE(sf_enc_ctx_shared));
}

static struct kobj_attribute sf_attr_enc_context_shared =
	__ATTR_RO(enc_context_shared);

static ssize_t mode_show(struct kobject *kobj, struct kobj_attribute *attr,
			 char *buf)
{
	return sysfs_emit(buf, "%s\n", sf_mode_names[READ_ONCE(sf_mode)]);
}

static ssize_t mode_store(struct kobject *kobj, struct kobj_attribute *attr,
			  const char *buf, size_t count)
{
	int ret = sf_mode_set(buf, count);

	return ret ? ret : count;
}

static struct kobj_attribute sf_attr_mode = __ATTR_RW(mode);

static struct attribute *sf_root_attrs[] = {
	&sf_attr_abi_version.attr,
	&sf_attr_mode.attr,
	&sf_attr_flushes_total.attr,
	&sf_attr_flushed_cpus_total.attr,
	&sf_attr_full_flushes_total.attr,
	&sf_attr_scrubs_total.attr,
	&sf_attr_scrubbed_cpus_total.attr,
	&sf_attr_targeted_available.attr,
	&sf_attr_alloc_failures_total.attr,
	&sf_attr_enc_context_shared.attr,
	NULL,
};

static const struct attribute_group sf_root_group = {
	.attrs = sf_root_attrs,
};

static ssize_t sf_vm_counter_show(struct kobject *kobj, size_t off, char *buf)
{
	atomic64_t *c = (atomic64_t *)((char *)sf_kobj_vm(kobj) + off);

	return sysfs_emit(buf, "%lld\n", (long long)atomic64_read(c));
}

#define SF_VM_COUNTER_ATTR(_name, _field)				\
static ssize_t vm_##_name##_show(struct kobject *kobj,			\
				 struct kobj_attribute *attr, char *buf)\
{									\
	return sf_vm_counter_show(kobj, offsetof(struct sf_vm, _field), buf); \
}									\
static struct kobj_attribute sf_vm_attr_##_name =			\
	__ATTR(_name, 0444, vm_##_name##_show, NULL)

SF_VM_COUNTER_ATTR(flushes, flushes);
SF_VM_COUNTER_ATTR(flushed_cpus, flushed_cpus);
SF_VM_COUNTER_ATTR(full_flushes, full_flushes);
SF_VM_COUNTER_ATTR(scrubs, scrubs);
SF_VM_COUNTER_ATTR(scrubbed_cpus, scrubbed_cpus);

static ssize_t vm_pid_show(struct kobject *kobj, struct kobj_attribute *attr,
			   char *buf)
{
	return sysfs_emit(buf, "%d\n", sf_kobj_vm(kobj)->pid);
}

static struct kobj_attribute sf_vm_attr_pid = __ATTR(pid, 0444, vm_pid_show, NULL);

static ssize_t vm_dirty_cpus_show(struct kobject *kobj,
				  struct kobj_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%*pbl\n",
			  cpumask_pr_args(&sf_kobj_vm(kobj)->dirty));
}

static struct kobj_attribute sf_vm_attr_dirty_cpus =
	__ATTR(dirty_cpus, 0444, vm_dirty_cpus_show, NULL);

static ssize_t vm_ran_cpus_show(struct kobject *kobj,
				struct kobj_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%*pbl\n",
			  cpumask_pr_args(&sf_kobj_vm(kobj)->ran));
}

static struct kobj_attribute sf_vm_attr_ran_cpus =
	__ATTR(ran_cpus, 0444, vm_ran_cpus_show, NULL);

static ssize_t vm_unknown_past_show(struct kobject *kobj,
				    struct kobj_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%d\n",
			  test_bit(SF_VM_UNKNOWN_PAST,
				   &sf_kobj_vm(kobj)->flags) ? 1 : 0);
}

static struct kobj_attribute sf_vm_attr_unknown_past =
	__ATTR(unknown_past, 0444, vm_unknown_past_show, NULL);

static const char * const sf_conf_names[SF_CONF_NR] = {
	[SF_CONF_UNKNOWN] = "unknown",
	[SF_CONF_NONE] = "none",
	[SF_CONF_SEV] = "sev",
	[SF_CONF_SEV_ES] = "sev-es",
	[SF_CONF_SEV_SNP] = "sev-snp",
};

static ssize_t vm_confidential_show(struct kobject *kobj,
				    struct kobj_attribute *attr, char *buf)
{
	int c = READ_ONCE(sf_kobj_vm(kobj)->conf);

	return sysfs_emit(buf, "%s\n", sf_conf_names[c]);
}

static ssize_t vm_confidential_store(struct kobject *kobj,
				     struct kobj_attribute *attr,
				     const char *buf, size_t count)
{
	int c;

	for (c = 0; c < SF_CONF_NR; c++) {
		if (sf_token(buf, count, sf_conf_names[c])) {
			WRITE_ONCE(sf_kobj_vm(kobj)->conf, c);
			return count;
		}
	}
	return -EINVAL;
}

static struct kobj_attribute sf_vm_attr_confidential =
	__ATTR(confidential, 0644, vm_confidential_show, vm_confidential_store);

static ssize_t vm_scrub_store(struct kobject *kobj, struct kobj_attribute *attr,
			      const char *buf, size_t count)
{
	if (!sf_token(buf, count, "1"))
		return -EINVAL;
	/* Process context, IRQs on; the kobject keeps the record alive. */
	sf_flush_vm(sf_kobj_vm(kobj), SF_WHY_SCRUB);
	return count;
}

static struct kobj_attribute sf_vm_attr_scrub =
	__ATTR(scrub, 0200, NULL, vm_scrub_store);

static struct attribute *sf_vm_attrs[] = {
	&sf_vm_attr_pid.attr,
	&sf_vm_attr_dirty_cpus.attr,
	&sf_vm_attr_ran_cpus.attr,
	&sf_vm_attr_flushes.attr,
	&sf_vm_attr_flushed_cpus.attr,
	&sf_vm_attr_confidential.attr,
	&sf_vm_attr_scrub.attr,
	&sf_vm_attr_unknown_past.attr,
	&sf_vm_attr_full_flushes.attr,
	&sf_vm_attr_scrubs.attr,
	&sf_vm_attr_scrubbed_cpus.attr,
	NULL,
};
ATTRIBUTE_GROUPS(sf_vm);

static const struct kobj_type sf_vm_ktype = {
	.release = sf_vm_release,
	.sysfs_ops = &kobj_sysfs_ops,
	.default_groups = sf_vm_groups,
};

/* ---- init and exit --------------------------------------------------- */

static void sf_unregister_targeted(void)
{
	unsigned int i;

	if (sf_wbinvd_kp_ok) {
		unregister_kprobe(&sf_wbinvd_kp);
		sf_wbinvd_kp_ok = false;
	}
	/* Wait for tasks still running sf_wbinvd_redirect(). */
	while (atomic_read(&sf_redirects_active))
		msleep(20);
	for (i = 0; i < ARRAY_SIZE(sf_callers); i++) {
		if (sf_caller_ok[i]) {
			unregister_kretprobe(&sf_callers[i]);
			sf_caller_ok[i] = false;
		}
	}
	for (i = 0; i < ARRAY_SIZE(sf_enc_ctx_kps); i++) {
		if (sf_enc_ctx_ok[i]) {
			unregister_kprobe(&sf_enc_ctx_kps[i]);
			sf_enc_ctx_ok[i] = false;
		}
	}
}

static void sf_register_targeted(void)
{
	bool enc_ctx_ok = true;
	unsigned int i;
	int ret;

	/* Installed before any redirect can happen. */
	for (i = 0; i < ARRAY_SIZE(sf_enc_ctx_kps); i++) {
		ret = register_kprobe(&sf_enc_ctx_kps[i]);
		sf_enc_ctx_ok[i] = !ret;
		enc_ctx_ok &= !ret;
		pr_info("hook %s: %s (%d)\n", sf_enc_ctx_kps[i].symbol_name,
			ret ? "not installed" : "installed", ret);
	}

	for (i = 0; i < ARRAY_SIZE(sf_callers); i++) {
		ret = register_kretprobe(&sf_callers[i]);
		sf_caller_ok[i] = !ret;
		pr_info("hook %s: %s (%d)\n", sf_callers[i].kp.symbol_name,
			ret ? "not installed" : "installed", ret);
	}
	ret = register_kprobe(&sf_wbinvd_kp);
	sf_wbinvd_kp_ok = !ret;
	pr_info("hook %s: %s (%d)\n", SF_REDIRECT_SYM,
		ret ? "not installed" : "installed", ret);

	sf_targeted_available = sf_wbinvd_kp_ok && sf_caller_ok[0] &&
		enc_ctx_ok;
}

static void sf_remove_all_records(void)
{
	struct sf_vm *vm;

	while ((vm = sf_vm_unlink(NULL)))
		queue_work(sf_wq, &sf_obj(vm)->del_work);
	flush_workqueue(sf_wq);
}

static int __init sevflush_init(void)
{
	int ret;

	sf_core_init();
	if (boot_cpu_has(X86_FEATURE_WBNOINVD))
		sf_flush_how = SF_FLUSH_WBNOINVD;

	sf_wq = alloc_ordered_workqueue("sevflush", 0);
	if (!sf_wq)
		return -ENOMEM;

	ret = -ENOMEM;
	sf_root_kobj = kobject_create_and_add("sevflush", kernel_kobj);
	if (!sf_root_kobj)
		goto err_wq;
	ret = sysfs_create_group(sf_root_kobj, &sf_root_group);
	if (ret)
		goto err_root;
	ret = -ENOMEM;
	sf_vms_kobj = kobject_create_and_add("vms", sf_root_kobj);
	if (!sf_vms_kobj)
		goto err_root;

	ret = cpuhp_setup_state_nocalls(CPUHP_AP_ONLINE_DYN, "sevflush:online",
					sf_cpu_online, NULL);
	if (ret < 0)
		goto err_vms;
	sf_cpuhp_state = ret;

	/* Removal first: no record may outlive its VM. */
	ret = register_kprobe(&sf_destroy_vm_kp);
	if (ret) {
		pr_err("cannot hook kvm_arch_destroy_vm (%d): not loading\n",
		       ret);
		goto err_cpuhp;
	}

	ret = register_kretprobe(&sf_init_vm_krp);
	sf_init_vm_ok = !ret;
	if (ret)
		pr_warn("cannot hook kvm_arch_init_vm (%d): every VM has an unknown past, its first flush is full\n",
			ret);

	ret = register_trace_kvm_entry(sf_probe_kvm_entry, NULL);
	if (ret) {
		pr_err("cannot attach to the kvm_entry tracepoint (%d): not loading\n",
		       ret);
		goto err_init_vm;
	}

	/*
	 * After the grace period the probe runs on every guest entry of every
	 * CPU; records made from here on have an exact past.
	 */
	synchronize_rcu();
	/* Release: the flag is seen only after the probe is live. */
	smp_store_release(&sf_tracking_exact, true);

	sf_register_targeted();
	sf_initialized = true;
	if (sf_mode_wanted_targeted && sf_targeted_available)
		WRITE_ONCE(sf_mode, SF_MODE_TARGETED);
	else if (sf_mode_wanted_targeted)
		pr_warn("targeted flush hooks unavailable: running in observe mode\n");

	pr_info("loaded: abi %d, mode %s, targeted %savailable, flush with %s, kvm_entry probe with %d args\n",
		SF_ABI_VERSION, sf_mode_names[sf_mode],
		sf_targeted_available ? "" : "un",
		sf_flush_how == SF_FLUSH_WBNOINVD ? "wbnoinvd" : "wbinvd",
		SEVFLUSH_KVM_ENTRY_ARGS);
	return 0;

err_init_vm:
	if (sf_init_vm_ok)
		unregister_kretprobe(&sf_init_vm_krp);
	unregister_kprobe(&sf_destroy_vm_kp);
	sf_remove_all_records();
err_cpuhp:
	cpuhp_remove_state_nocalls(sf_cpuhp_state);
err_vms:
	kobject_put(sf_vms_kobj);
err_root:
	kobject_put(sf_root_kobj);
err_wq:
	destroy_workqueue(sf_wq);
	return ret;
}

static void __exit sevflush_exit(void)
{
	WRITE_ONCE(sf_mode, SF_MODE_OBSERVE);
	sf_unregister_targeted();
	unregister_trace_kvm_entry(sf_probe_kvm_entry, NULL);
	tracepoint_synchronize_unregister();
	if (sf_init_vm_ok)
		unregister_kretprobe(&sf_init_vm_krp);
	unregister_kprobe(&sf_destroy_vm_kp);
	sf_remove_all_records();
	cpuhp_remove_state_nocalls(sf_cpuhp_state);
	destroy_workqueue(sf_wq);
	kobject_put(sf_vms_kobj);
	kobject_put(sf_root_kobj);
	pr_info("unloaded\n");
}

module_init(sevflush_init);
module_exit(sevflush_exit);

MODULE_LICENSE("GPL");
MODULE_AUTHOR("sevplace");
MODULE_DESCRIPTION("Per-VM dirty-CPU tracking and targeted cache flushes for AMD SEV guests");
MODULE_SOFTDEP("pre: kvm_amd");
