# pragma version ~=0.4.3
"""
@title Settlement
@notice Payer escrow in OPEN, node settlement batches, exact fee splits, pull payments.

        Payers `deposit` OPEN and sign an EIP-712 `Authorization(payer, node, cap, expiry, nonce)`
        for a node. The node serves requests, signs a receipt for each, and once per epoch sends
        one `settle` transaction from its registered signing key with a compact charge per
        receipt (sequence number, receipt id, authorization, billable token counts, adapters and
        their composition weights in ppm). The contract then checks, itself:
        - the sender is an active node in the NodeRegistry;
        - each authorization is signed by its payer and names this node;
        - sequence numbers rise strictly past the node's last settled one, so no receipt settles
          twice (one storage write per batch, not one per receipt);
        and per charge (a failing charge is skipped with `ChargeSkipped`, the rest settle):
        - the authorization has not expired (plus `settlement_window` seconds to settle);
        - every private adapter allows the payer;
        - the fee fits the authorization's remaining cap and the payer's escrow.
        It prices each charge from the registries and splits it with the same integer rules as
        the node's receipts (openlora/attribution/receipts.py), so each payee's credit equals its
        receipt payouts to the base unit:
        - base-only: fee = (P * node prompt price + C * node completion price) // 1000, all to
          the operator, at the node's price version named by the charge (prices are versioned in
          the NodeRegistry, so a later price change never reprices a signed receipt); an
          adapter that is not registered is priced and paid the same way;
        - adapters: cost_i = ppm_i * (P * prompt price_i + C * completion price_i),
          fee = sum(cost_i) // 10^9, portions by largest remainder over cost_i (ties: lower
          adapter id), each portion split by basis points (operator, owner, data; ties in that
          order), the data part over the adapter's datanets by weight (ties: lower datanet id),
          and each datanet's part over its contributors by weight (ties: lower address). With
          span-level attribution the charge carries, per datanet, each contributor's span credit
          and lambda; the contributors' weights are then fixed_i * C * (1e6 - lambda) +
          credit_i * F * lambda (F, C: the sums), as the node's receipts blend them (its
          openlora/attribution/spans.py), and credits that sum to zero keep the fixed weights.
        Payees `claim` whenever they like. Withdrawals from escrow wait `withdrawal_delay`
        seconds, so a node that checked a payer's escrow before serving can still settle.
"""

from ethereum.ercs import IERC20
from snekmate.utils import ecdsa
from snekmate.utils import eip712_domain_separator as eip712

initializes: eip712

exports: eip712.eip712Domain

MAX_ADAPTERS: public(constant(uint256)) = 4
MAX_DATANETS: constant(uint256) = 8
MAX_CONTRIBUTORS: constant(uint256) = 32
MAX_AUTHS: public(constant(uint256)) = 64
MAX_CHARGES: public(constant(uint256)) = 256
MAX_ADAPTER_CACHE: constant(uint256) = 8
MAX_SPAN_LINES: constant(uint256) = 256  # per batch
MAX_CHARGE_SPANS: constant(uint256) = 8  # per charge
PPM_X_1000: constant(uint256) = 10 ** 9
BPS: constant(uint256) = 10_000

SKIP_EXPIRED: constant(uint8) = 1
SKIP_ACCESS: constant(uint8) = 2
SKIP_CAP: constant(uint8) = 3
SKIP_ESCROW: constant(uint8) = 4

AUTH_TYPEHASH: constant(bytes32) = keccak256(
    "Authorization(address payer,address node,uint256 cap,uint256 expiry,uint256 nonce)")


struct Authorization:
    payer: address
    node: address
    cap: uint256  # the most the node may charge under this authorization, in base units
    expiry: uint256  # unix seconds; the node serves under it until then
    nonce: uint256


struct SignedAuthorization:
    auth: Authorization
    signature: Bytes[65]


struct AdapterCharge:
    adapter_id: bytes32  # keccak256 of the adapter's served name
    weight_ppm: uint32  # composition share; a charge's shares sum to 1,000,000


struct SpanCredits:
    charge_index: uint16  # which charge of the batch (lines sorted by it)
    adapter_index: uint8  # which of the charge's adapters
    datanet_index: uint8  # which of that adapter's datanets (registry order)
    lambda_ppm: uint32  # share of the datanet's amount that follows the credits
    credits: DynArray[uint64, MAX_CONTRIBUTORS]  # answer tokens credited, per contributor in registry order


struct Charge:
    seq: uint64  # the receipt's sequence number in the node's ledger
    receipt_id: bytes32  # the signed receipt's EIP-712 hash
    auth_index: uint16  # index into the batch's authorizations
    prompt_tokens: uint64  # billable prompt tokens (0 when the request did not finish)
    completion_tokens: uint64
    adapters: DynArray[AdapterCharge, MAX_ADAPTERS]  # empty: base model only
    price_version: uint32  # the node's base price version the receipt was priced with


# The registries' views, as this contract reads them.
struct DatanetUse:
    datanet_id: bytes32
    weight: uint32


struct Adapter:
    owner: address
    content_hash: bytes32
    base_model_hash: bytes32
    manifest_hash: bytes32
    price_prompt: uint256
    price_completion: uint256
    operator_bps: uint16
    owner_bps: uint16
    data_bps: uint16
    datanets: DynArray[DatanetUse, MAX_DATANETS]
    is_public: bool
    active: bool


struct Contributor:
    account: address
    weight: uint32


interface INodes:
    def is_active(signer: address) -> bool: view
    def terms(signer: address, version: uint256) -> (address, uint256, uint256): view


interface IAdapters:
    def get(adapter_id: bytes32) -> Adapter: view
    def can_use(adapter_id: bytes32, account: address) -> bool: view


interface IDatanets:
    def contributors(datanet_id: bytes32) -> DynArray[Contributor, MAX_CONTRIBUTORS]: view


event Deposited:
    payer: indexed(address)
    amount: uint256


event WithdrawalRequested:
    payer: indexed(address)
    amount: uint256
    available_at: uint256


event Withdrawn:
    payer: indexed(address)
    amount: uint256


event Settled:
    node: indexed(address)
    epoch: indexed(uint64)
    receipts_root: bytes32
    first_seq: uint64
    last_seq: uint64
    charges: uint256
    settled: uint256
    total: uint256


event ChargeSkipped:
    node: indexed(address)
    seq: uint64
    receipt_id: bytes32
    reason: uint8


event Claimed:
    account: indexed(address)
    amount: uint256


token: public(IERC20)
nodes: public(INodes)
adapters: public(IAdapters)
datanets: public(IDatanets)
withdrawal_delay: public(uint256)
settlement_window: public(uint256)

escrow: HashMap[address, uint256]
pending_withdrawal: public(HashMap[address, uint256])
withdrawal_at: public(HashMap[address, uint256])
credits: HashMap[address, uint256]
claimed: public(HashMap[address, uint256])
spent: public(HashMap[bytes32, uint256])  # authorization digest -> charged so far
last_seq: public(HashMap[address, uint64])  # node -> last settled receipt seq
total_escrow: public(uint256)
total_claimable: public(uint256)


@deploy
def __init__(token: IERC20, nodes: INodes, adapters: IAdapters, datanets: IDatanets,
             withdrawal_delay: uint256, settlement_window: uint256):
    eip712.__init__("OpenLoRA Settlement", "1")
    self.token = token
    self.nodes = nodes
    self.adapters = adapters
    self.datanets = datanets
    self.withdrawal_delay = withdrawal_delay
    self.settlement_window = settlement_window


# ------------------------------------------------------------------------------------ escrow

@external
@nonreentrant
def deposit(amount: uint256):
    """@notice Move `amount` OPEN from the caller into its escrow (approve it first)."""
    assert amount > 0, "settlement: zero deposit"
    self.escrow[msg.sender] += amount
    self.total_escrow += amount
    assert extcall self.token.transferFrom(msg.sender, self, amount, default_return_value=True), "settlement: transfer failed"
    log Deposited(payer=msg.sender, amount=amount)


@external
def request_withdrawal(amount: uint256):
    """@notice Announce a withdrawal; it can be taken after `withdrawal_delay` seconds. Until
            then the amount still backs charges (a new request replaces the previous one)."""
    assert amount > 0 and amount <= self.escrow[msg.sender], "settlement: amount exceeds escrow"
    self.pending_withdrawal[msg.sender] = amount
    self.withdrawal_at[msg.sender] = block.timestamp + self.withdrawal_delay
    log WithdrawalRequested(payer=msg.sender, amount=amount, available_at=block.timestamp + self.withdrawal_delay)


@external
@nonreentrant
def withdraw() -> uint256:
    """@notice Take the announced withdrawal (less whatever was charged meanwhile)."""
    pending: uint256 = self.pending_withdrawal[msg.sender]
    assert pending > 0, "settlement: no withdrawal requested"
    assert block.timestamp >= self.withdrawal_at[msg.sender], "settlement: withdrawal still locked"
    amount: uint256 = min(pending, self.escrow[msg.sender])
    self.pending_withdrawal[msg.sender] = 0
    self.escrow[msg.sender] -= amount
    self.total_escrow -= amount
    assert extcall self.token.transfer(msg.sender, amount, default_return_value=True), "settlement: transfer failed"
    log Withdrawn(payer=msg.sender, amount=amount)
    return amount


@view
@external
def escrowOf(payer: address) -> uint256:
    """@notice The payer's escrow (a pending withdrawal still counts until taken)."""
    return self.escrow[payer]


@view
@external
def available(payer: address) -> uint256:
    """@notice Escrow that is not announced for withdrawal: what a node may count on."""
    return self.escrow[payer] - min(self.pending_withdrawal[payer], self.escrow[payer])


@view
@external
def claimable(account: address) -> uint256:
    return self.credits[account]


@external
@nonreentrant
def claim() -> uint256:
    """@notice Send the caller everything credited to it (checks, effects, then the transfer)."""
    amount: uint256 = self.credits[msg.sender]
    assert amount > 0, "settlement: nothing to claim"
    self.credits[msg.sender] = 0
    self.total_claimable -= amount
    self.claimed[msg.sender] += amount
    assert extcall self.token.transfer(msg.sender, amount, default_return_value=True), "settlement: transfer failed"
    log Claimed(account=msg.sender, amount=amount)
    return amount


# ------------------------------------------------------------------------------ authorization

@view
@internal
def _auth_digest(a: Authorization) -> bytes32:
    return eip712._hash_typed_data_v4(
        keccak256(abi_encode(AUTH_TYPEHASH, a.payer, a.node, a.cap, a.expiry, a.nonce)))


@view
@external
def authorization_digest(a: Authorization) -> bytes32:
    """@notice The EIP-712 digest a payer signs (and the key of `spent`)."""
    return self._auth_digest(a)


# ---------------------------------------------------------------------------------- splitting

@pure
@internal
def _split(total: uint256, weights: DynArray[uint256, MAX_CONTRIBUTORS],
           keys: DynArray[uint256, MAX_CONTRIBUTORS]) -> DynArray[uint256, MAX_CONTRIBUTORS]:
    """
    @dev Largest remainder: floor(total * w_i / W) each, then the units left over one each to the
         largest remainders (total * w_i) mod W, ties to the lower key, then the earlier position.
         Same rule as openlora/attribution/splits.py:split_exact.
    """
    n: uint256 = len(weights)
    if n == 1 and weights[0] > 0:
        return [total]  # the common case (one adapter, one datanet): nothing to divide
    wsum: uint256 = 0
    for w: uint256 in weights:
        wsum += w
    amounts: DynArray[uint256, MAX_CONTRIBUTORS] = []
    if wsum == 0:
        assert total == 0, "settlement: positive total over zero weights"
        for i: uint256 in range(MAX_CONTRIBUTORS):
            if i >= n:
                break
            amounts.append(0)
        return amounts
    rems: DynArray[uint256, MAX_CONTRIBUTORS] = []
    given: uint256 = 0
    for w: uint256 in weights:
        a: uint256 = total * w // wsum
        amounts.append(a)
        rems.append(total * w % wsum)
        given += a
    left: uint256 = total - given  # fewer than the parts with w > 0
    taken: DynArray[bool, MAX_CONTRIBUTORS] = []
    for i: uint256 in range(MAX_CONTRIBUTORS):
        if i >= n:
            break
        taken.append(False)
    for _: uint256 in range(MAX_CONTRIBUTORS):
        if left == 0:
            break
        best: uint256 = n
        for i: uint256 in range(MAX_CONTRIBUTORS):
            if i >= n:
                break
            if weights[i] == 0 or taken[i]:
                continue
            if best == n or rems[i] > rems[best] or (rems[i] == rems[best] and keys[i] < keys[best]):
                best = i
        amounts[best] += 1
        taken[best] = True
        left -= 1
    return amounts


@internal
def _credit(account: address, amount: uint256):
    if amount > 0:
        self.credits[account] += amount


@internal
def _pay_adapter(portion: uint256, a: Adapter, operator: address, spans: DynArray[SpanCredits, MAX_CHARGE_SPANS],
                 index: uint256):
    """Split one adapter's portion (the charge's adapter `index`): operator / owner / data, then datanets,
    then contributors (by their weights, or blended with the charge's span credits)."""
    parts: DynArray[uint256, MAX_CONTRIBUTORS] = self._split(
        portion, [convert(a.operator_bps, uint256), convert(a.owner_bps, uint256), convert(a.data_bps, uint256)],
        [0, 1, 2])
    self._credit(operator, parts[0])
    self._credit(a.owner, parts[1])
    if parts[2] == 0:
        return
    dw: DynArray[uint256, MAX_CONTRIBUTORS] = []
    dk: DynArray[uint256, MAX_CONTRIBUTORS] = []
    for d: DatanetUse in a.datanets:
        dw.append(convert(d.weight, uint256))
        dk.append(convert(d.datanet_id, uint256))
    d_amounts: DynArray[uint256, MAX_CONTRIBUTORS] = self._split(parts[2], dw, dk)
    for j: uint256 in range(MAX_DATANETS):
        if j >= len(a.datanets):
            break
        if d_amounts[j] == 0:
            continue
        cs: DynArray[Contributor, MAX_CONTRIBUTORS] = staticcall self.datanets.contributors(a.datanets[j].datanet_id)
        cw: DynArray[uint256, MAX_CONTRIBUTORS] = []
        ck: DynArray[uint256, MAX_CONTRIBUTORS] = []
        for c: Contributor in cs:
            cw.append(convert(c.weight, uint256))
            ck.append(convert(c.account, uint256))
        for sc: SpanCredits in spans:
            if convert(sc.adapter_index, uint256) != index or convert(sc.datanet_index, uint256) != j:
                continue
            assert len(sc.credits) == len(cs), "settlement: span credits must name every contributor"
            lam: uint256 = convert(sc.lambda_ppm, uint256)
            assert lam <= 1_000_000, "settlement: lambda above 1,000,000 ppm"
            f_sum: uint256 = 0
            c_sum: uint256 = 0
            for k: uint256 in range(MAX_CONTRIBUTORS):
                if k >= len(cs):
                    break
                f_sum += cw[k]
                c_sum += convert(sc.credits[k], uint256)
            if c_sum > 0 and lam > 0:
                for k: uint256 in range(MAX_CONTRIBUTORS):
                    if k >= len(cs):
                        break
                    cw[k] = cw[k] * c_sum * (1_000_000 - lam) + convert(sc.credits[k], uint256) * f_sum * lam
            break
        c_amounts: DynArray[uint256, MAX_CONTRIBUTORS] = self._split(d_amounts[j], cw, ck)
        for k: uint256 in range(MAX_CONTRIBUTORS):
            if k >= len(cs):
                break
            self._credit(cs[k].account, c_amounts[k])


# --------------------------------------------------------------------------------- settlement

@external
@nonreentrant
def settle(epoch: uint64, receipts_root: bytes32, auths: DynArray[SignedAuthorization, MAX_AUTHS],
           charges: DynArray[Charge, MAX_CHARGES],
           spans: DynArray[SpanCredits, MAX_SPAN_LINES]) -> (uint256, uint256):
    """
    @notice Settle one batch of the caller's receipts (see the contract notice for the rules).
            `receipts_root` is the node's Merkle root over the epoch's receipt hashes (logged for
            audits). `spans`: the span credits of the charges that have them, sorted by charge
            index (a separate array: inside each charge they made every charge's calldata copy
            cost their bound). Returns (charges settled, total charged).
    """
    assert staticcall self.nodes.is_active(msg.sender), "settlement: not an active node"
    assert len(charges) > 0, "settlement: empty batch"
    operator: address = empty(address)
    node_pp: uint256 = 0
    node_pc: uint256 = 0
    version: uint32 = 0  # price version loaded into node_pp/node_pc (0: none yet)

    # NOTE: loops index into the calldata arrays: `for x in array` would first copy the whole
    # array (bounded at MAX_CHARGES) into memory, ~0.7M gas of memory expansion per call.
    digests: DynArray[bytes32, MAX_AUTHS] = []
    for k: uint256 in range(len(auths), bound=MAX_AUTHS):
        sa: SignedAuthorization = auths[k]
        assert sa.auth.node == msg.sender, "settlement: authorization names another node"
        d: bytes32 = self._auth_digest(sa.auth)
        assert ecdsa._recover_sig(d, sa.signature) == sa.auth.payer, "settlement: bad authorization signature"
        digests.append(d)

    cached_ids: DynArray[bytes32, MAX_ADAPTER_CACHE] = []
    cached: DynArray[Adapter, MAX_ADAPTER_CACHE] = []
    prev: uint64 = self.last_seq[msg.sender]
    first: uint64 = charges[0].seq
    settled: uint256 = 0
    total: uint256 = 0
    sp: uint256 = 0  # next line of `spans`
    for n: uint256 in range(len(charges), bound=MAX_CHARGES):
        c: Charge = charges[n]
        mine: DynArray[SpanCredits, MAX_CHARGE_SPANS] = []
        for _: uint256 in range(MAX_CHARGE_SPANS):
            if sp >= len(spans) or convert(spans[sp].charge_index, uint256) != n:
                break
            mine.append(spans[sp])
            sp += 1
        assert sp >= len(spans) or convert(spans[sp].charge_index, uint256) > n, "settlement: span lines"
        assert c.seq > prev, "settlement: receipt already settled or out of order"
        prev = c.seq
        assert convert(c.auth_index, uint256) < len(digests), "settlement: no such authorization"
        sa: SignedAuthorization = auths[c.auth_index]
        payer: address = sa.auth.payer
        # (written so that an expiry of 2**256 - 1, "never", cannot overflow)
        if block.timestamp > sa.auth.expiry and block.timestamp - sa.auth.expiry > self.settlement_window:
            log ChargeSkipped(node=msg.sender, seq=c.seq, receipt_id=c.receipt_id, reason=SKIP_EXPIRED)
            continue

        if c.price_version != version:  # usually once per batch
            version = c.price_version
            operator, node_pp, node_pc = staticcall self.nodes.terms(msg.sender, convert(version, uint256))

        # Price the charge. Unregistered adapters are priced and paid like the base model.
        p: uint256 = convert(c.prompt_tokens, uint256)
        q: uint256 = convert(c.completion_tokens, uint256)
        fee: uint256 = 0
        terms: DynArray[Adapter, MAX_ADAPTERS] = []
        costs: DynArray[uint256, MAX_CONTRIBUTORS] = []
        keys: DynArray[uint256, MAX_CONTRIBUTORS] = []
        denied: bool = False
        if len(c.adapters) == 0:
            fee = (p * node_pp + q * node_pc) // 1000
        else:
            ppm_sum: uint256 = 0
            cost_sum: uint256 = 0
            for ac: AdapterCharge in c.adapters:
                a: Adapter = empty(Adapter)
                hit: bool = False
                for j: uint256 in range(MAX_ADAPTER_CACHE):
                    if j >= len(cached_ids):
                        break
                    if cached_ids[j] == ac.adapter_id:
                        a = cached[j]
                        hit = True
                        break
                if not hit:  # terms are immutable: one registry read per adapter per batch
                    a = staticcall self.adapters.get(ac.adapter_id)
                    if len(cached_ids) < MAX_ADAPTER_CACHE:
                        cached_ids.append(ac.adapter_id)
                        cached.append(a)
                if a.owner == empty(address):
                    a = empty(Adapter)
                    a.price_prompt = node_pp
                    a.price_completion = node_pc
                    a.operator_bps = 10_000
                elif not a.is_public and a.owner != payer:
                    if not staticcall self.adapters.can_use(ac.adapter_id, payer):
                        denied = True
                cost: uint256 = convert(ac.weight_ppm, uint256) * (p * a.price_prompt + q * a.price_completion)
                terms.append(a)
                costs.append(cost)
                keys.append(convert(ac.adapter_id, uint256))
                ppm_sum += convert(ac.weight_ppm, uint256)
                cost_sum += cost
            assert ppm_sum == 1_000_000, "settlement: adapter weights must sum to 1,000,000 ppm"
            fee = cost_sum // PPM_X_1000
        if denied:
            log ChargeSkipped(node=msg.sender, seq=c.seq, receipt_id=c.receipt_id, reason=SKIP_ACCESS)
            continue
        dg: bytes32 = digests[c.auth_index]
        if self.spent[dg] + fee > sa.auth.cap:
            log ChargeSkipped(node=msg.sender, seq=c.seq, receipt_id=c.receipt_id, reason=SKIP_CAP)
            continue
        if fee > self.escrow[payer]:
            log ChargeSkipped(node=msg.sender, seq=c.seq, receipt_id=c.receipt_id, reason=SKIP_ESCROW)
            continue

        # Effects: debit the payer, credit every payee (pull payments; no external transfer here).
        self.spent[dg] += fee
        self.escrow[payer] -= fee
        settled += 1
        total += fee
        if len(c.adapters) == 0:
            self._credit(operator, fee)
            continue
        portions: DynArray[uint256, MAX_CONTRIBUTORS] = self._split(fee, costs, keys)
        for i: uint256 in range(MAX_ADAPTERS):
            if i >= len(terms):
                break
            self._pay_adapter(portions[i], terms[i], operator, mine, i)

    assert sp == len(spans), "settlement: span lines out of order"
    self.last_seq[msg.sender] = prev
    self.total_escrow -= total
    self.total_claimable += total
    log Settled(node=msg.sender, epoch=epoch, receipts_root=receipts_root, first_seq=first, last_seq=prev,
                charges=len(charges), settled=settled, total=total)
    return settled, total
